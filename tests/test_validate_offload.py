"""Offload targets in a job spec: CPU memory (`true` / `cpu`) or NVMe files (`nvme` + `nvme_path`).

Both train in tests/test_train.py (ZeRO-3 with CPU offload against ZeRO-0, with NVMe offload against
CPU offload). NVMe offload needs DeepSpeed's async_io op, which links libaio (infra/setup.sh installs
`libaio-dev` where it can): where that cannot build, a spec asking for it ends with one line saying
so before Ray starts, instead of failing inside every worker.
"""

from __future__ import annotations

from pathlib import Path

from test_bad_input import assert_one_line_exit_2, ray_sessions, run_batch

from conftest import tiny_spec, write_spec


def nvme_spec(name: str, **deepspeed) -> dict:
    return tiny_spec(name, deepspeed={"stage": 3, **deepspeed})


def test_offload_fields_are_checked_before_ray(workspace):
    a_file = workspace / "not-a-folder"
    a_file.write_text("x")
    cases = {
        "stage": (nvme_spec("nv-stage", stage=2, offload_optimizer="nvme", nvme_path=str(workspace)),
                  "offload_optimizer: nvme needs stage 3"),
        "no path": (nvme_spec("nv-nopath", offload_param="nvme"), "offload_param: nvme needs nvme_path"),
        "path alone": (nvme_spec("nv-alone", nvme_path=str(workspace)), "nvme_path is used only with"),
        "relative": (nvme_spec("nv-rel", offload_param="nvme", nvme_path="swap"), "swap is not an absolute path"),
        "device": (nvme_spec("nv-disk", offload_param="disk"), "'disk': use cpu, nvme, true (cpu) or false"),
        "missing": (nvme_spec("nv-missing", offload_param="nvme", nvme_path=str(workspace / "no-such-disk")),
                    f"deepspeed.nvme_path: {workspace / 'no-such-disk'} is not a directory"),
        "a file": (nvme_spec("nv-file", offload_optimizer="nvme", nvme_path=str(a_file)),
                   f"deepspeed.nvme_path: {a_file} is not a directory"),
    }
    paths = {label: write_spec(workspace / f"offload-{i}.yaml", spec)
             for i, (label, (spec, _)) in enumerate(cases.items())}
    argvs = [[command, str(paths[label])] for label in cases for command in ("validate", "run")]
    results, ray_tmp = run_batch(workspace, argvs)
    for result, (label, (_, expected)) in zip(results, [item for item in cases.items() for _ in range(2)]):
        line = assert_one_line_exit_2(result)
        assert expected in line, (label, line)
    assert not ray_sessions(ray_tmp)


def test_cpu_offload_spelled_true_or_cpu_is_one_setting():
    from onebase.spec import parse_spec
    from onebase.train.deepspeed_config import deepspeed_config

    zero = {}
    for spelled in (True, "cpu"):
        spec = parse_spec(nvme_spec("cpu-offload", offload_optimizer=spelled, offload_param=spelled))
        zero[spelled] = deepspeed_config(spec, "fp32")["zero_optimization"]
    assert zero[True] == zero["cpu"]
    assert zero[True]["offload_param"] == {"device": "cpu", "pin_memory": False}
    off = parse_spec(nvme_spec("no-offload", offload_optimizer=False))
    assert "offload_optimizer" not in deepspeed_config(off, "fp32")["zero_optimization"]


def without_libaio(folder: Path) -> dict[str, str]:
    """Environment in which DeepSpeed's libaio check fails as on a machine without libaio-dev: its test
    program links `-laio` with LDFLAGS, and `-L` here finds an empty libaio.so first (no io_submit)."""
    folder.mkdir(exist_ok=True)
    (folder / "libaio.so").write_bytes(b"")
    return {"LDFLAGS": f"-L{folder}"}


def test_the_async_io_check_finds_libaio_and_stays_silent(capfd, monkeypatch, tmp_path):
    """In-process, under pytest's capture of file descriptors 1 and 2: DeepSpeed's check redirects
    `sys.stderr.fileno()`, so silencing it with an io.StringIO made libaio look missing everywhere;
    neither DeepSpeed's log nor the compiler's errors may show (they would break `validate`'s one line)."""
    from onebase.train.ds_ops import async_io_missing

    assert async_io_missing() is None, "libaio-dev is missing: run infra/setup.sh as root or install it"
    assert capfd.readouterr() == ("", "")
    monkeypatch.setenv("LDFLAGS", without_libaio(tmp_path / "no-aio")["LDFLAGS"])
    assert async_io_missing().startswith("libaio not found")
    assert capfd.readouterr() == ("", "")


def test_nvme_offload_validates_and_fails_in_one_line_where_libaio_is_missing(workspace, tmp_path):
    """With libaio, `validate` accepts the spec (and `run --resume` refuses it); without libaio,
    `validate` and `run` end with one line naming the op and the library, and Ray never starts."""
    swap = tmp_path / "nvme"
    swap.mkdir()
    spec = nvme_spec("nv-ok", offload_optimizer="nvme", offload_param="nvme", nvme_path=str(swap))
    path = write_spec(workspace / "nvme-offload.yaml", spec)
    [accepted, resumed], _ = run_batch(workspace, [["validate", str(path)], ["run", "--resume", str(path)]])
    assert accepted["code"] == 0 and "ZeRO-3" in accepted["stdout"], accepted["stderr"][-2000:]
    # DeepSpeed's checkpoints leave out what its optimizer keeps on NVMe: no run continues from one
    line = assert_one_line_exit_2(resumed)
    assert line.startswith("onebase: error: --resume: deepspeed.offload_optimizer: nvme: DeepSpeed cannot continue")
    results, ray_tmp = run_batch(workspace, [[command, str(path)] for command in ("validate", "run")],
                                 env=without_libaio(tmp_path / "no-aio"))
    for result in results:
        line = assert_one_line_exit_2(result)
        assert line.startswith("onebase: error: deepspeed.offload_optimizer: nvme needs DeepSpeed's async_io op")
        assert "libaio not found" in line and "offload to cpu instead" in line
    assert not ray_sessions(ray_tmp)
    assert list(swap.iterdir()) == []  # the write check left nothing behind
