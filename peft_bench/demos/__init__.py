"""The tutorial's two demonstrations, run as commands that write CSV and plots like every benchmark."""

from __future__ import annotations

from pathlib import Path

from ..errors import UserError

DEMOS = ("svd", "mnist-lora")


def run(name: str, out: Path, method: str = "lora-parametrize", seed: int = 0) -> int:
    from ..results import prepare_out_dir

    if name not in DEMOS:
        raise UserError(f"unknown demo {name!r}; choose one of: {', '.join(DEMOS)}")
    if name == "svd":
        from .svd import main
    else:
        from .mnist_lora import check_method, main

        check_method(method)
    out = prepare_out_dir(out)
    return main(out, method=method, seed=seed)
