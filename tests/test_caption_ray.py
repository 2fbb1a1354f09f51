"""`llava-edge caption --ray` on a real Ray cluster on loopback (a head and a second node, `ray start`), run
as a user runs it: the same lines as a local `caption`, each image once whatever is killed (a worker actor's
process, the driver), Ctrl-C, a cluster that is not there, a worker that cannot open its bundle, no ray."""

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from llava_edge.bench.caption_case import make_images
from llava_edge.caption.ray_cluster import plan_workers
from llava_edge.errors import UserError

from caption_run import PROMPT, assert_each_once, caption, caption_cmd, read_lines
from hide_modules import cli_without
from ray_cluster import LocalCluster, free_port

pytestmark = pytest.mark.slow

ROOT = Path(__file__).parents[1]
BUNDLE = ROOT / "llava_edge" / "assets" / "demo" / "bundle"


def run_until(env, out: Path, n_lines: int, *args) -> subprocess.Popen:
    """A driver started and left running until --out has n_lines lines (it must not have finished)."""
    proc = subprocess.Popen(caption_cmd(*args), cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and proc.poll() is None:
        if out.exists() and out.read_bytes().count(b"\n") >= n_lines:
            return proc
        time.sleep(0.01)
    proc.kill()
    raise AssertionError(f"the run ended (or hung) before {n_lines} lines: {proc.poll()} {proc.stderr.read()[-2000:]}")


@pytest.fixture(scope="module")
def cluster(request):
    pytest.importorskip("ray.data")
    c = LocalCluster(cpus_per_node=[1, 1])  # two nodes of one CPU: two workers of one thread, one on each
    yield c
    c.stop()
    if request.session.testsfailed:
        print(f"\nthe Ray cluster's logs are kept in {c.temp_dir}")
    else:
        shutil.rmtree(c.temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def many(tmp_path_factory):
    d = tmp_path_factory.mktemp("many")
    make_images(d, 160, seed=11)
    return d


def test_lines_equal_local_caption(cluster, caption_folder, tmp_path):
    local, remote = tmp_path / "local.jsonl", tmp_path / "ray.jsonl"
    proc = caption(caption_folder, "--out", local, "--parallel", "2", env=cluster.env)
    assert proc.returncode == 1, proc.stderr[-3000:]  # the broken file has no answer
    proc = caption(caption_folder, "--out", remote, "--parallel", "2", "--ray", cluster.address, "--workers", "2",
                   env=cluster.env)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "2 workers of 1 threads, on a cluster of 2 nodes (2 CPUs)" in proc.stderr
    assert "Traceback" not in proc.stderr

    def by_path(out):
        return {r["path"]: (r["sha256"], r["prompt"], r.get("answer"), r.get("error"), r.get("finish_reason"))
                for r in read_lines(out)}

    got = by_path(remote)
    assert len(read_lines(remote)) == len(list(caption_folder.iterdir())) == len(got)
    assert got == by_path(local)
    for name in ("green_triangle.png", "broken.png"):  # the lines themselves, against the files
        sha, prompt, answer, error, _ = got[str(caption_folder / name)]
        assert sha == hashlib.sha256((caption_folder / name).read_bytes()).hexdigest() and prompt == PROMPT
    assert got[str(caption_folder / "green_triangle.png")][2] == "A green triangle."
    assert str(caption_folder / "broken.png") in got[str(caption_folder / "broken.png")][3]
    # a rerun asks again only the file without an answer
    again = caption(caption_folder, "--out", remote, "--ray", cluster.address, env=cluster.env)
    assert again.returncode == 1, again.stderr[-3000:]
    assert f"1 lines written to {remote}, 1 errors (a rerun tries them again), {len(got) - 1} already there" in again.stderr
    assert read_lines(remote)[-1]["path"] == str(caption_folder / "broken.png")


def test_the_token_ray_left_in_the_home_dir_is_used(cluster, tmp_path):
    """As after `ray start --head` found ~/.ray/auth_token (Ray 2.59+): the cluster wants the token, and the
    driver's environment says nothing of token authentication."""
    home = tmp_path / "home"
    env = {k: v for k, v in cluster.env.items() if k not in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN")} | {"HOME": str(home)}
    out = tmp_path / "token.jsonl"
    args = (ROOT / "examples" / "green_triangle.png", "--out", out, "--ray", cluster.address)
    refused = caption(*args, env=env)  # no token at hand: the cluster refuses the driver
    assert refused.returncode == 2 and "cannot join the cluster" in refused.stderr, refused.stderr[-3000:]
    (home / ".ray").mkdir(parents=True)
    (home / ".ray" / "auth_token").write_text(cluster.env["RAY_AUTH_TOKEN"])
    proc = caption(*args, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [r["answer"] for r in read_lines(out)] == ["A green triangle."]


def test_ray_client_address_gives_the_same_lines(cluster, caption_folder, tmp_path):
    out = tmp_path / "client.jsonl"
    proc = caption(ROOT / "examples", "--out", out, "--ray", cluster.client_address, "--workers", "2", env=cluster.env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    answers = {Path(r["path"]).name: r["answer"] for r in read_lines(out)}
    assert answers["green_triangle.png"] == "A green triangle."
    assert len(answers) == len(list((ROOT / "examples").glob("*.png")))


def test_a_killed_worker_is_replaced_and_each_image_written_once(cluster, many, tmp_path):
    out = tmp_path / "worker-killed.jsonl"
    proc = run_until(cluster.env, out, 12, many, "--out", out, "--ray", cluster.address, "--workers", "2",
                     "--parallel", "2")
    victims = cluster.worker_pids()
    assert victims, "no worker actor process found"
    os.kill(victims[0], signal.SIGKILL)
    killed_at = out.read_bytes().count(b"\n")
    _, stderr = proc.communicate(timeout=240)
    assert proc.returncode == 0, stderr[-3000:]
    assert killed_at < len(list(many.iterdir())), "the kill did not land mid-run"
    assert victims[0] not in cluster.worker_pids()
    assert_each_once(out, many)


def test_ctrl_c_then_sigkill_then_resume(cluster, many, tmp_path):
    out = tmp_path / "driver-killed.jsonl"
    args = (many, "--out", out, "--ray", cluster.address, "--workers", "2", "--parallel", "2")
    proc = run_until(cluster.env, out, 8, *args)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr[-3000:]
    assert "interrupted: run the same command again to continue" in stderr
    first = len(read_lines(out))
    assert 8 <= first < len(list(many.iterdir()))

    proc = run_until(cluster.env, out, first + 8, *args)
    proc.kill()
    proc.wait(30)
    second = len(read_lines(out))  # whole lines only: a torn tail would fail here or be cut by the rerun
    assert second < len(list(many.iterdir())), "the kill did not land mid-run"

    again = caption(*args, env=cluster.env)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "already there" in again.stderr
    assert_each_once(out, many)


def test_a_worker_that_cannot_open_the_bundle_fails_the_run_in_one_line(cluster, caption_folder, tmp_path):
    bad = tmp_path / "bundle"
    shutil.copytree(BUNDLE, bad)
    decoder = next(bad.glob("decoder-*.gguf"))
    data = bytearray(decoder.read_bytes())
    data[-1] ^= 0xFF  # the manifest's sha256 no longer matches: the worker's Engine.open refuses it
    decoder.write_bytes(bytes(data))
    out = tmp_path / "bad.jsonl"
    proc = caption(ROOT / "examples", "--out", out, "--bundle", bad, "--ray", cluster.address, env=cluster.env)
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("llava-edge: error:")]
    assert len(errors) == 1 and "cannot open the bundle" in errors[0] and "sha256" in errors[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert out.read_bytes() == b""


def test_local_starts_a_cluster_here(cluster, tmp_path):
    out = tmp_path / "local-cluster.jsonl"
    env = {**cluster.env, "RAY_TMPDIR": cluster.temp_dir}
    proc = caption(ROOT / "examples" / "green_triangle.png", "--out", out, "--ray", "local", env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [r["answer"] for r in read_lines(out)] == ["A green triangle."]


@pytest.mark.parametrize("address", ["127.0.0.1:{port}", "ray://127.0.0.1:{port}", "nowhere"])
def test_an_unreachable_cluster_is_one_line_and_exit_2(address, caption_folder, tmp_path):
    address = address.format(port=free_port())  # nothing listens there
    t0 = time.monotonic()
    proc = caption(caption_folder, "--out", tmp_path / "x.jsonl", "--ray", address, env=dict(os.environ), timeout=60)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert time.monotonic() - t0 < 30
    errors = [line for line in proc.stderr.strip().splitlines() if line.startswith("llava-edge: error:")]
    assert errors and errors == proc.stderr.strip().splitlines()[-1:], proc.stderr[-2000:]
    assert f"--ray {address}" in errors[0]


def test_without_ray_installed_it_names_the_extra(tmp_path):
    proc = subprocess.run([sys.executable, "-c", cli_without("ray"), "caption", str(ROOT / "examples"), "--out",
                           str(tmp_path / "x.jsonl"), "--ray", "local"], capture_output=True, text=True, timeout=60,
                          cwd=ROOT)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "llava-edge: error: `llava-edge caption --ray` needs ray, not installed here: pip install 'llava-edge[ray]' "
        "(from a clone: pip install '.[ray]')"]


def test_workers_without_ray_is_refused(tmp_path):
    proc = subprocess.run(caption_cmd(ROOT / "examples", "--out", tmp_path / "x.jsonl", "--workers", "2"),
                          capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert proc.returncode == 2 and "--workers needs --ray" in proc.stderr
    assert not (tmp_path / "x.jsonl").exists()


@pytest.mark.parametrize("cpus, workers, threads, expected", [
    ([8, 8], None, None, (2, 8)),  # one worker per node, all its cores
    ([8, 8], 4, None, (4, 4)),
    ([16, 4], 2, None, (2, 8)),  # 8 + 8 fit on the 16-core node
    ([4, 4, 4], 2, None, (2, 4)),  # 6 each would fit on no node
    ([2], 2, 1, (2, 1)),
    ([0, 3], None, None, (1, 3)),  # a node without CPUs (a head kept free) takes no worker
])
def test_plan_workers(cpus, workers, threads, expected):
    assert plan_workers(cpus, workers, threads) == expected


@pytest.mark.parametrize("cpus, workers, threads", [([2, 2], 3, 2), ([4], 1, 8), ([0], None, None)])
def test_plan_workers_refuses_what_the_cluster_cannot_hold(cpus, workers, threads):
    with pytest.raises(UserError):
        plan_workers(cpus, workers, threads)
