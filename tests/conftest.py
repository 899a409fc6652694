"""pytest set-up shared by every test file."""


def pytest_configure(config):
    # tests/test_slurm.py starts real Slurm daemons; CI runs it (tests/run.sh installs Slurm when it
    # can), `-m "not slurm"` leaves it out
    config.addinivalue_line("markers", "slurm: starts a real one-node Slurm (slurmctld + slurmd)")
