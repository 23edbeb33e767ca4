"""From episode files to training arrays: load, render, tokenise, build the vocabulary, pack."""

from __future__ import annotations

from echo_jax import corpus
from echo_jax.config import DataConfig
from echo_jax.episodes import Episode, EpisodeError, load_episodes
from echo_jax.packing import PackedData, pack, tokenize_episodes
from echo_jax.vocab import Vocab, build_vocab


def load_data_episodes(cfg: DataConfig) -> list[Episode]:
    """Episodes named by cfg.paths: files and globs whole, corpus folders by cfg.split."""
    episodes: list[Episode] = []
    for path in cfg.paths:
        if corpus.is_corpus(path):
            splits = corpus.read_manifest(path)["splits"]
            episodes += corpus.select(load_episodes(corpus.shard_files(path)), splits, cfg.split)
        else:
            episodes += load_episodes([path])
    return episodes


def load_packed(cfg: DataConfig, vocab: Vocab | None = None) -> tuple[PackedData, Vocab]:
    """Packs cfg.paths; builds the vocabulary from them unless one is given (a resumed run's)."""
    episodes = load_data_episodes(cfg)
    if not episodes:
        raise EpisodeError(",".join(cfg.paths), f"<split {cfg.split}>", "holds no episodes")
    tokenized = tokenize_episodes(episodes, cfg.canonical_json)
    if vocab is None:
        vocab = build_vocab([t.ids for t in tokenized], cfg.vocab_size, cfg.vocab_min_count)
    return pack(episodes, tokenized, vocab, cfg.max_len, cfg.overflow), vocab
