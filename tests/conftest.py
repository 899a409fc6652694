"""pytest set-up shared by every test file."""


def pytest_configure(config):
    # tests/test_slurm.py starts real Slurm daemons; CI runs it (tests/run.sh installs Slurm when it
    # can), `-m "not slurm"` leaves it out
    config.addinivalue_line("markers", "slurm: starts a real one-node Slurm (slurmctld + slurmd)")


import pytest  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _close_worlds_after_each_file():
    """The forked gloo worlds of one test file are closed when it ends. Every layout a world has
    used keeps megatron-core's ~15 process groups, each with gloo's socket-loop threads; worlds of
    2, 4 and 8 ranks all kept alive to the end of the suite wake ~1,000 such threads on 2 cores
    and slow every later test. The next file forks fresh worlds (about a second each)."""
    yield
    import harness

    harness._close_all()
