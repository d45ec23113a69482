"""What the `sparse-rt bench` smoke tests share: run a suite through the real entry point, check a usage error."""
from __future__ import annotations

import pytest

from sparse_rt.cli import main


def run_bench(capsys, suite: str, *argv: str) -> tuple[int, str, str]:
    """`sparse-rt bench SUITE ARGV...` in this process: its exit code, stdout and stderr."""
    with pytest.raises(SystemExit) as info:
        main(["bench", suite, *argv])
    captured = capsys.readouterr()
    return info.value.code, captured.out, captured.err


def bench_usage_error(capsys, suite: str, *argv: str) -> str:
    """Run a suite that must refuse its options: exit code 2, nothing on stdout, one line on stderr; that line."""
    code, out, err = run_bench(capsys, suite, *argv)
    assert code == 2 and out == "", (code, out, err)
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err
