"""Offload targets in a job spec: CPU memory (`true` / `cpu`) or NVMe files (`nvme` + `nvme_path`).

CPU offload trains in tests/test_train.py (ZeRO-3 with both offloads against ZeRO-0). NVMe offload
needs DeepSpeed's async_io op, which links libaio: where that cannot build, a spec asking for it ends
with one line saying so before Ray starts, instead of failing inside every worker.
"""

from __future__ import annotations

from test_bad_input import assert_one_line_exit_2, fresh_ray_tmp, ray_sessions, run_batch

from conftest import onebase_cli, tiny_spec, write_spec


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


def test_nvme_offload_fails_in_one_line_where_deepspeeds_async_io_cannot_build(workspace, tmp_path):
    """With a writable nvme_path, `validate` passes where libaio is there; where it is not (this
    project's CPU machines), `validate` and `run` end with one line naming the op and the library."""
    from onebase.train.ds_ops import async_io_missing

    swap = tmp_path / "nvme"
    swap.mkdir()
    spec = nvme_spec("nv-ok", offload_optimizer="nvme", offload_param="nvme", nvme_path=str(swap))
    path = write_spec(workspace / "nvme-offload.yaml", spec)
    missing = async_io_missing()
    ray_tmp = fresh_ray_tmp()
    for command in ("validate",) + (("run",) if missing else ()):
        result = onebase_cli(command, str(path), cwd=workspace, timeout=300,
                             env={"RAY_TMPDIR": str(ray_tmp)})
        if not missing:
            assert result.returncode == 0, result.stderr[-2000:]
            continue
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert result.returncode == 2 and len(lines) == 1, result.stderr[-2000:]  # no DeepSpeed warnings either
        assert lines[0].startswith("onebase: error: deepspeed.offload_optimizer: nvme needs DeepSpeed's async_io op")
        assert "libaio" in lines[0] and "offload to cpu instead" in lines[0]
        assert not ray_sessions(ray_tmp)
