"""Failures of a run that are expected in operation: each ends the run with one clear line (megatron_swift.cli)."""


class Diverged(RuntimeError):
    """Too many consecutive steps had to be skipped (non-finite loss or gradients, loss spikes); exit code 3."""


class CheckpointError(ValueError):
    """A checkpoint cannot be used (corrupt, incomplete, from another run or layout); the message names it."""



class NoSpace(CheckpointError):
    """The file system cannot hold the next checkpoint; the previous ones are kept (exit code 2)."""
