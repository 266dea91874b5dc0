"""The EDM reference numbers of ``tests/test_networks.py`` (``EDM_OUTPUTS``), and the script that makes them.

``reference_numbers`` is the procedure: build a network under ``torch.manual_seed(0)`` (EDM draws its
initial weights from the global generator), sum the absolute values of its state, then give every
parameter fixed random values and evaluate it on fixed inputs. The test runs it on our networks and
compares with the numbers that the same procedure gave on NVlabs' own classes.

EDM's code cannot be part of this repository (CC BY-NC-SA 4.0). To recompute the numbers, get a
checkout of https://github.com/NVlabs/edm (commit 008a4e5 reproduces the table) outside the
repository and run, from the repository root::

    python tests/edm_reference.py --edm /path/to/edm          # EDM's numbers, as the table's rows
    python tests/edm_reference.py --edm /path/to/edm --check  # and compare them with EDM_OUTPUTS

Only ``training/networks.py`` of the checkout is loaded; its ``torch_utils.persistence`` decorator
(which only adds pickling) is replaced by a no-op, so neither ``dnnlib`` nor ``requests`` is needed.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import types
from collections.abc import Callable
from pathlib import Path

import torch

RESOLUTION, CHANNELS = 8, 3
SIGMAS = (0.3, 5.0)


def reference_numbers(make: Callable[[], torch.nn.Module], label_dim: int, augment: bool):
    """(sum |initial state|, output (2, C, R, R) float64) of the network that ``make()`` builds.

    The parameters are then set to 0.2 * N(0, 1) from a generator seeded 1 (in ``named_parameters``
    order), and the network is evaluated on x ~ N(0, 1) (2, 3, 8, 8), augmentation labels (2, 9)
    from a generator seeded 2, sigma (0.3, 5.0) and one-hot classes 1 and 3 when conditional.
    """
    torch.manual_seed(0)
    net = make().eval()
    init_sum = sum(float(t.double().abs().sum()) for t in net.state_dict().values())
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, p in net.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
        g2 = torch.Generator().manual_seed(2)
        x = torch.randn(2, CHANNELS, RESOLUTION, RESOLUTION, generator=g2)
        extra = {"augment_labels": torch.randn(2, 9, generator=g2)} if augment else {}
        labels = torch.eye(label_dim)[[1, 3]] if label_dim else None
        out = net(x, torch.tensor(SIGMAS), labels, **extra).double()
    return init_sum, out


def summary(init_sum: float, out: torch.Tensor) -> tuple[float, float, float, list[float]]:
    """The four numbers the table holds: sum |init state|, sum D, sum |D|, D[1, 2, 3, :4]."""
    row = [round(v, 6) for v in out[1, 2, 3, :4].tolist()]
    return init_sum, float(out.sum()), float(out.abs().sum()), row


def load_edm_networks(edm: Path) -> types.ModuleType:
    """``training/networks.py`` of an NVlabs/edm checkout, with a no-op ``persistence`` decorator."""
    source = edm / "training" / "networks.py"
    if not source.is_file():
        raise SystemExit(f"{edm}: not an NVlabs/edm checkout (no training/networks.py)")
    persistence = types.ModuleType("torch_utils.persistence")
    persistence.persistent_class = lambda cls: cls
    package = types.ModuleType("torch_utils")
    package.persistence = persistence
    sys.modules.setdefault("torch_utils", package)
    sys.modules.setdefault("torch_utils.persistence", persistence)
    spec = importlib.util.spec_from_file_location("edm_training_networks", source)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--edm", type=Path, required=True, help="a checkout of NVlabs/edm")
    parser.add_argument("--check", action="store_true", help="compare with EDM_OUTPUTS of test_networks.py")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from test_networks import EDM_OUTPUTS  # the table, with the settings of each row

    edm = load_edm_networks(args.edm)
    failures = 0
    for name, (cls, label_dim, kwargs, expected) in sorted(EDM_OUTPUTS.items()):
        edm_cls = getattr(edm, cls.__name__)
        make = lambda: edm_cls(RESOLUTION, CHANNELS, label_dim, **kwargs)  # noqa: B023 (called at once)
        got = summary(*reference_numbers(make, label_dim, bool(kwargs.get("augment_dim"))))
        print(f"{name!r}: {got},")
        if args.check:
            init_ok = abs(got[0] - expected[0]) <= 1e-9 * abs(expected[0])
            sums_ok = abs(got[1] - expected[1]) <= 1e-4 * abs(expected[1]) + 1e-3
            abs_ok = abs(got[2] - expected[2]) <= 1e-5 * abs(expected[2])
            row_ok = all(abs(a - b) <= 1e-5 + 1e-4 * abs(b) for a, b in zip(got[3], expected[3]))
            ok = init_ok and sums_ok and abs_ok and row_ok
            failures += not ok
            print(f"    {'matches' if ok else 'DIFFERS FROM'} the table: {expected}")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
