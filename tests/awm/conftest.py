"""`verify`: each verifier test runs on the cold path (`run_verifier`, a fresh sandboxed process)
and on a warm worker (`warm_verifier.WarmWorker`, one per test session, so that every test
also follows others in the same worker). The warm side calls the worker itself, never the
pool, so that a failing worker fails the test instead of falling back to the cold path."""

import pytest

from echo_jax.awm import sandbox
from echo_jax.awm.verifier import VerifierLimits, run_verifier
from echo_jax.awm.warm_verifier import WarmWorker


@pytest.fixture(scope="session")
def warm_worker():
    worker = WarmWorker(sandbox.require_sandbox("the tests"))
    yield worker
    worker.close()


@pytest.fixture(params=["cold", "warm"])
def verify(request):
    """run_verifier's signature, on the path the test's id names."""
    if request.param == "cold":
        return run_verifier
    worker = request.getfixturevalue("warm_worker")

    def warm(code, initial_db_path, final_db_path, final_answer=None, limits=None):
        limits = limits or VerifierLimits()
        return worker.verify(code, initial_db_path, final_db_path, final_answer, limits)

    warm.mode = "warm"
    return warm
