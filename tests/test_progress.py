"""The progress line's ETA (issue 27, item 6): the first step of a 2-minute run said 1:32:09."""
from megatron_swift.observe import progress
from megatron_swift.observe.progress import Progress


def test_eta_leaves_out_the_warm_up_steps(monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(progress.time, "monotonic", lambda: clock[0])
    p = Progress(total_iters=100, max_epochs=None, start_iter=10)  # a resume at step 10
    etas = []
    for iteration, seconds in ((11, 60.0), (12, 1.0), (13, 1.0), (14, 1.0), (20, 6.0)):
        clock[0] += seconds  # the first step after a (re)start costs a minute, the others a second
        etas.append(p.eta(iteration))
    assert etas == ["--", "--", "0:01:27", "0:01:26", "0:01:20"]
