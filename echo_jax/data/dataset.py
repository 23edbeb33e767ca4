"""From episode files to training arrays: load, render, tokenise, build the vocabulary, pack."""

from __future__ import annotations

from echo_jax.config import DataConfig
from echo_jax.data import corpus, data_cache
from echo_jax.data.episode_files import SkipReport, dedupe, load_episodes
from echo_jax.data.episodes import Episode, EpisodeError
from echo_jax.data.packing import PackedData, pack, tokenize_episodes
from echo_jax.data.vocab import Vocab, build_vocab, full_vocab


def load_data_episodes(cfg: DataConfig) -> list[Episode]:
    """Episodes named by cfg.paths: files and globs whole, corpus folders by cfg.split.

    With cfg.skip_invalid, invalid and duplicate episodes are left out and logged by reason.
    """
    episodes: list[Episode] = []
    skip, report = cfg.skip_invalid, SkipReport()
    for path in cfg.paths:
        if corpus.is_corpus(path):
            splits = corpus.read_manifest(path)["splits"]
            episodes += corpus.select(
                load_episodes(corpus.shard_files(path), skip, report=report), splits, cfg.split
            )
        else:
            episodes += load_episodes([path], skip, report=report)
    episodes = dedupe(episodes, skip, report)  # The same episode named by two paths.
    report.loaded = len(episodes)
    report.log(",".join(cfg.paths))
    return episodes


def load_packed(cfg: DataConfig, vocab: Vocab | None = None) -> tuple[PackedData, Vocab]:
    """Packs cfg.paths; builds the vocabulary from them unless one is given (a resumed run's,
    or a checkpoint's own: data.hf_tokenizer.HFVocab, whose rows are never cached).

    The result is cached under cfg.cache_dir by a hash of the inputs and settings.
    """
    key = data_cache.cache_key(cfg, vocab)
    if (cached := data_cache.load(cfg, key)) is not None:
        return cached
    episodes = load_data_episodes(cfg)
    if not episodes:
        raise EpisodeError(",".join(cfg.paths), f"<split {cfg.split}>", "holds no episodes")
    tokenized = tokenize_episodes(episodes, cfg.canonical_json, vocab)
    if vocab is None and cfg.vocab_size == 0:
        vocab = full_vocab()
    elif vocab is None:
        vocab = build_vocab([t.ids for t in tokenized], cfg.vocab_size, cfg.vocab_min_count)
    data = pack(episodes, tokenized, vocab, cfg.max_len, cfg.overflow)
    data_cache.save(cfg, key, data, vocab)
    return data, vocab
