"""The batch client across several fake ComfyUI servers (loopback): servers that die, hang, come back or answer
errors lose no item, run none twice, and the manifest lists each finished item once."""

from __future__ import annotations

import collections
import hashlib
import json
import threading
import time
from pathlib import Path

import pytest
from tests.helpers.fake_comfyui import fake_servers, make_images, write_workflow

from kontext_core.tools import comfyui_client as queue


@pytest.fixture
def make_server():
    with fake_servers() as make:
        yield make


def run_fleet(servers, tmp_path: Path, *extra: str, count: int = 12) -> int:
    if not (tmp_path / "in").exists():
        make_images(tmp_path / "in", count)
    flags = [flag for server in servers for flag in ("--server", server.url)]
    return queue.main(
        [
            *flags,
            "--workflow",
            str(write_workflow(tmp_path)),
            "--out",
            str(tmp_path / "out"),
            "--images",
            str(tmp_path / "in"),
            "--prompt",
            "p",
            *extra,
        ]
    )


def manifest(tmp_path: Path) -> list[dict]:
    return [json.loads(line) for line in (tmp_path / "out" / queue.MANIFEST_FILE).read_text().splitlines()]


def image_of(body: dict) -> str:
    """Which input image a queued prompt was for (uploads are named after the image)."""
    return body["prompt"]["10"]["inputs"]["image"].split("/")[1].rsplit("_", 1)[0]


def assert_complete(tmp_path: Path, count: int) -> list[dict]:
    """Every item has exactly one manifest line, its output file, and the right bytes."""
    lines = manifest(tmp_path)
    assert sorted(line["item"] for line in lines) == sorted(f"img_{i}.png" for i in range(count))
    for line in lines:
        data = (tmp_path / "out" / line["output"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == line["sha256"]
        assert data == (tmp_path / "in" / line["item"]).read_bytes() + b'["p", 7]'  # the fake's "edit"
    assert not list((tmp_path / "out").glob(".*partial"))
    return lines


def test_two_servers_share_the_batch_and_the_manifest_names_each(make_server, tmp_path, capsys):
    servers = [make_server(seconds=0.05), make_server(seconds=0.05)]
    assert run_fleet(servers, tmp_path) == 0
    lines = assert_complete(tmp_path, 12)
    by_server = collections.Counter(line["server"] for line in lines)
    assert set(by_server) == {s.url for s in servers} and min(by_server.values()) >= 3
    for server in servers:  # the manifest's server is the one that ran it, and each image ran once
        ran = sorted(image_of(body) for body in server.prompts)
        assert ran == sorted(line["item"][:-4] for line in lines if line["server"] == server.url)
    assert {line["attempts"] for line in lines} == {1}
    err = capsys.readouterr().err
    assert "12 done, 0 already done, 0 failed" in err
    assert all(f"server {s.url}: {by_server[s.url]} done, 0 failed attempts, in rotation" in err for s in servers)


def test_a_server_that_dies_mid_item_loses_nothing_and_rejoins_when_back(make_server, tmp_path, capsys):
    steady = make_server(seconds=0.05)
    dying = make_server(seconds=0.05, outcome=lambda prompt: "die" if len(dying.prompts) == 3 else "success")
    port = dying.server_address[1]
    revived = []

    def restart_later() -> None:  # ComfyUI restarted on the same port while the batch goes on
        while not dying.closed:
            time.sleep(0.02)
        time.sleep(0.3)
        revived.append(make_server(port=port, seconds=0.05))

    threading.Thread(target=restart_later, daemon=True).start()
    assert run_fleet([steady, dying], tmp_path, "--retry-after", "0.2", count=24) == 0
    lines = assert_complete(tmp_path, 24)
    lost = image_of(dying.prompts[-1])  # the one it died on: it got no more
    (requeued,) = [line for line in lines if line["attempts"] == 2]
    assert requeued["item"] == f"{lost}.png" and requeued["server"] != dying.url
    assert [image_of(body) for body in steady.prompts + revived[0].prompts].count(lost) == 1
    assert revived[0].prompts, "the restarted server took items again"
    # every image was queued once, except the one in flight when its server died
    queued = collections.Counter(image_of(b) for s in (steady, dying, revived[0]) for b in s.prompts)
    assert queued == {f"img_{i}": 2 if f"img_{i}" == lost else 1 for i in range(24)}
    err = capsys.readouterr().err
    assert f"server {dying.url} out of rotation: does not answer" in err
    assert f"server {dying.url} answers again: back in rotation" in err


@pytest.mark.parametrize("websocket", [True, False])
def test_a_hung_or_erroring_server_leaves_the_rotation_and_its_item_runs_elsewhere(make_server, tmp_path, websocket):
    steady = make_server(seconds=0.02)
    # over the websocket a silence is a hang; without one, an HTTP 500 is an error of the server's own
    failure = "hang" if websocket else "http500"
    bad = make_server(websocket=websocket, outcome=lambda prompt: failure if len(bad.prompts) >= 1 else "success")
    args = ("--stall-timeout", "0.5", "--retry-after", "60")
    started = time.monotonic()
    assert run_fleet([steady, bad], tmp_path, *args) == 0
    assert time.monotonic() - started < 10
    lines = assert_complete(tmp_path, 12)
    assert sum(line["server"] == bad.url for line in lines) <= 1  # its first item at most, before it went bad
    if websocket:
        hung = f"p{len(bad.prompts) - 1}"
        assert bad.cancelled == [("/queue", {"delete": [hung]}), ("/interrupt", {"prompt_id": hung})]


def test_an_item_that_fails_on_two_servers_is_reported_failed_not_retried_forever(make_server, tmp_path, capsys):
    def bad_image(prompt):
        return (
            ("error", "bad pixels") if prompt["10"]["inputs"]["image"].split("/")[1].startswith("img_3_") else "success"
        )

    servers = [make_server(outcome=bad_image) for _ in range(3)]
    assert run_fleet(servers, tmp_path, count=6) == 1
    assert sum(image_of(b) == "img_3" for s in servers for b in s.prompts) == 2
    assert sorted(line["item"] for line in manifest(tmp_path)) == [f"img_{i}.png" for i in (0, 1, 2, 4, 5)]
    err = capsys.readouterr().err
    assert "img_3: FAILED: node 15 (KontextCoreSampler) failed: ValueError: bad pixels (tried on" in err
    assert "5 done, 0 already done, 1 failed" in err
    assert "out of rotation" not in err  # the item's own error: no server is blamed


def test_a_server_whose_items_fail_but_run_elsewhere_leaves_the_rotation(make_server, tmp_path, capsys):
    good = make_server(seconds=0.05)
    broken = make_server(outcome=lambda prompt: ("error", "CUDA out of memory"))
    assert run_fleet([good, broken], tmp_path, "--retry-after", "60") == 0
    assert_complete(tmp_path, 12)
    assert len(broken.prompts) == queue.fleet.STRIKES_OUT
    assert f"server {broken.url} out of rotation: 2 items in a row failed there and ran on another server" in (
        capsys.readouterr().err
    )


def test_when_no_server_answers_the_items_fail_after_the_give_up_time(make_server, tmp_path, capsys):
    server = make_server(outcome=lambda prompt: "die")
    started = time.monotonic()
    assert run_fleet([server], tmp_path, "--retry-after", "0.2", "--give-up-after", "1", count=3) == 1
    assert time.monotonic() - started < 10
    err = capsys.readouterr().err
    assert "img_0: FAILED: RemoteDisconnected" in err or "img_0: FAILED: URLError" in err
    assert err.count("no server it may run on has answered for 1 s") == 2
    assert "0 done, 0 already done, 3 failed" in err


def test_a_manifest_line_cut_short_by_a_crash_is_dropped_and_its_item_rerun_once(make_server, tmp_path):
    server = make_server()
    assert run_fleet([server], tmp_path, count=4) == 0
    path = tmp_path / "out" / queue.MANIFEST_FILE
    text = path.read_text()
    path.write_text(text[: text.rindex("\n", 0, len(text) - 1) + 1] + text.splitlines()[-1][:25])
    assert run_fleet([server], tmp_path, count=4) == 0
    assert len(server.prompts) == 5
    lines = assert_complete(tmp_path, 4)
    assert len(lines) == 4 and path.read_text().endswith("\n")

    # a tampered output is not taken for done: the item runs again and keeps one line
    (tmp_path / "out" / lines[0]["output"]).write_bytes(b"not the edit")
    assert run_fleet([server], tmp_path, count=4) == 0
    assert len(server.prompts) == 6 and len(assert_complete(tmp_path, 4)) == 4


def test_servers_come_from_a_file_and_are_checked(make_server, tmp_path, capsys):
    servers = [make_server(), make_server()]
    listed = tmp_path / "servers.txt"
    listed.write_text(f"# the fleet\n{servers[0].url}\n\n{servers[1].url}  # gpu 1\n")
    assert run_fleet([], tmp_path, "--servers", str(listed), count=4) == 0
    assert {line["server"] for line in manifest(tmp_path)} <= {s.url for s in servers}
    assert run_fleet([servers[0]], tmp_path, "--servers", str(listed)) == 2
    assert f"--server: {servers[0].url} given more than once" in capsys.readouterr().err


def test_a_server_down_at_the_start_joins_when_it_answers(make_server, tmp_path, capsys):
    up = make_server(seconds=0.05)
    down = make_server()
    port = down.server_address[1]
    down.close()
    later = []
    threading.Timer(0.3, lambda: later.append(make_server(port=port, seconds=0.05))).start()
    assert run_fleet([up, down], tmp_path, "--retry-after", "0.2", count=16) == 0
    assert_complete(tmp_path, 16)
    err = capsys.readouterr().err
    assert f"no ComfyUI answers at {down.url}" in err and f"server {down.url} answers again" in err
    assert later[0].prompts


def test_a_server_waiting_for_a_verdict_no_other_server_can_give_keeps_working(make_server, tmp_path, capsys):
    """After an item fails on A with an error of its own, A waits for it to run elsewhere before taking more; with
    the only other server dead, no verdict can come, so A goes on and the item fails after the give-up time."""

    def first_image_fails(prompt):
        return (
            ("error", "bad pixels") if prompt["10"]["inputs"]["image"].split("/")[1].startswith("img_0_") else "success"
        )

    working = make_server(outcome=first_image_fails, seconds=0.05)
    dead = make_server(outcome=lambda prompt: "die")
    make_images(tmp_path / "in", 8)
    exit_code, started = [], time.monotonic()
    args = ("--retry-after", "0.2", "--give-up-after", "4")
    batch = threading.Thread(target=lambda: exit_code.append(run_fleet([working, dead], tmp_path, *args)))
    batch.start()
    while batch.is_alive() and not ((tmp_path / "out" / queue.MANIFEST_FILE).exists() and len(manifest(tmp_path)) == 7):
        time.sleep(0.02)
    others_done = time.monotonic() - started
    batch.join(20)
    assert exit_code == [1] and others_done < 3  # the seven others did not wait out the give-up time
    assert sorted(line["item"] for line in manifest(tmp_path)) == [f"img_{i}.png" for i in range(1, 8)]
    assert all(line["server"] == working.url for line in manifest(tmp_path))
    assert "1 failed" in capsys.readouterr().err
