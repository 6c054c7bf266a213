"""Issue 15, part 2: the training step never reads a tensor on the host. Losses return their logs as detached
tensors (summed per epoch on the device); on CUDA a few steps run under `set_sync_debug_mode("error")`."""
import pytest
import torch

from bench.config import resolve
from bench.nn.bound import PairwiseBound
from bench.optim import make_lr_scheduler, make_optimizer
from bench.registry import ARCHS, METHODS
from bench.train import train_run

CASES = [("cll", "moons-mlp", (2,), 2), ("gloro", "moons-mlp", (2,), 2), ("standard", "moons-mlp", (2,), 2),
         ("soc", "lipconv-10", (3, 32, 32), 10), ("cpl", "cpl-s", (3, 32, 32), 10),
         ("sll", "sll-s", (3, 32, 32), 10), ("lbdn", "sandwich", (3, 32, 32), 10),
         ("local-lip", "4c3f-relux", (3, 32, 32), 10)]


@pytest.mark.parametrize("method", [c[0] for c in CASES])
def test_loss_logs_are_tensors_or_numbers_never_host_reads(method, monkeypatch):
    """A loss's logs are 0-d tensors or Python numbers; the loss never calls `.item()`/`float()` on a tensor.
    Global methods get a pairwise bound of the kind their networks give; Local-Lip-B its own network's."""
    name, arch, shape, classes = next(c for c in CASES if c[0] == method)
    cfg = resolve({"method": name, "arch": arch, "dataset": "moons" if shape == (2,) else "cifar10"})
    torch.manual_seed(0)
    m = METHODS.get(name)(cfg, classes)
    y = torch.randint(0, classes, (4,))
    if name == "local-lip":
        model = ARCHS.get(cfg["arch"])(shape, classes, cfg.get("normalize"))
        model.configure(cfg)
        x = torch.rand(4, *shape)
        logits, bound = model(x), model.bound(x=x, eps=m.bound_eps(0.5), n_iter=1)
    else:
        logits = torch.randn(4, classes, requires_grad=True)
        bound = PairwiseBound(torch.tensor(2.0, requires_grad=True), torch.randn(classes, 6, requires_grad=True))
    reads = []
    for attr in ("item", "__float__", "tolist"):
        orig = getattr(torch.Tensor, attr)
        monkeypatch.setattr(torch.Tensor, attr, lambda self, *a, _o=orig, **k: reads.append(attr) or _o(self, *a, **k))
    loss, logs = m.loss(logits, y, bound, 0.5)
    monkeypatch.undo()
    assert not reads, f"{name}'s loss reads tensors on the host: {reads}"
    assert loss.dim() == 0
    for k, v in logs.items():
        assert isinstance(v, (int, float)) or (isinstance(v, torch.Tensor) and v.dim() == 0 and not v.requires_grad), k


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU: set_sync_debug_mode is a CUDA feature")
@pytest.mark.parametrize("method", [c[0] for c in CASES])
def test_training_steps_do_not_sync_on_cuda(method):
    name, arch, shape, classes = next(c for c in CASES if c[0] == method)
    cfg = resolve({"method": name, "arch": arch, "dataset": "moons" if shape == (2,) else "cifar10"})
    dev = torch.device("cuda")
    torch.manual_seed(0)
    model = ARCHS.get(cfg["arch"])(shape, classes, cfg.get("normalize")).to(dev)
    if hasattr(model, "configure"):
        model.configure(cfg)
    m = METHODS.get(name)(cfg, classes)
    opt = make_optimizer(cfg, model)
    sched = make_lr_scheduler(cfg, opt, 10)
    x, y = torch.rand(8, *shape, device=dev), torch.randint(0, classes, (8,), device=dev)
    model.train()
    for step in range(3):
        if step == 1:   # the first step may allocate and set up; from the second on nothing may sync
            torch.cuda.set_sync_debug_mode("error")
        try:
            logits = model(x)
            bound = model.bound(x=x, eps=m.bound_eps(step / 10), n_iter=int(cfg["power_iter"]))
            loss, _ = m.loss(logits, y, bound, step / 10)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            model.project_()
            sched.step()
        finally:
            torch.cuda.set_sync_debug_mode("default")


def test_epoch_log_is_the_mean_of_the_steps(tmp_path):
    """metrics.csv's loss-log columns are the epoch means of the step values (kept on the device until the
    epoch ends)."""
    cfg = resolve({"method": "cll", "arch": "moons-mlp", "epochs": 1, "n_train": 300, "n_test": 100,
                   "lower_bound_pairs": 4, "lower_bound_steps": 1})
    cfg["seed"] = 1
    steps = []
    import methods.cll as cll

    orig = cll.CLL.loss

    def spy(self, *a, **k):
        out = orig(self, *a, **k)
        steps.append(float(out[1]["ce"]))
        return out

    cll.CLL.loss = spy
    try:
        train_run(cfg, tmp_path)
    finally:
        cll.CLL.loss = orig
    from bench import store
    folder = next(p.parent for p in tmp_path.rglob("metrics.csv"))
    row = store.read_metrics(folder)[0]
    assert float(row["ce"]) == pytest.approx(sum(steps) / len(steps), rel=1e-9)
