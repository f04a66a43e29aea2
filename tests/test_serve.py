"""mltk serve: the API answers as `mltk search` / `mltk verify` / `EmbeddingModel.embed` do; enrol and remove round
trip; every refusal is JSON with its status; the token, the upload bounds and thumbnails by number only; concurrent
enrolments and searches; a kill -9 during an enrolment; the page in a real browser."""

import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, one_line_error

from mltk import index as mindex
from mltk.data import load_data, select_classes

pytestmark = pytest.mark.xdist_group("serve")  # the index and the server are built once per module, on one worker


@pytest.fixture(scope="module")
def model(trained_run):
    from mltk.model import load

    return load(trained_run[0], device="cpu")


@pytest.fixture(scope="module")
def served(model, trained_run, tmp_path_factory) -> Path:
    """A calibrated flat index of classes 0-6 (threshold at the EER), written once: tests copy it before editing."""
    folder = trained_run[1]
    out = tmp_path_factory.mktemp("serve") / "idx"
    data = select_classes(load_data(str(folder)), ["class_0[0-6]"])
    mindex.write_index_dir(model, data, out, "flat", workers=0, calibrate=str(folder), far="eer")
    return out


@pytest.fixture
def index(served, tmp_path) -> Path:
    return Path(shutil.copytree(served, tmp_path / "idx"))


def client_for(index: Path, model, **settings):
    from fastapi.testclient import TestClient

    from mltk.serve import ServeSettings, create_app

    return TestClient(create_app(ServeSettings(index, **{"engine": "torch", **settings}).check(), model=model))


@pytest.fixture
def client(index, model):
    with client_for(index, model) as c:
        yield c


def png(path: Path) -> tuple:
    return (path.name, path.read_bytes(), "image/png")


def test_search_verify_and_embed_answer_as_the_library_does(client, index, model, trained_run):
    folder = trained_run[1]
    query = folder / "class_02" / "1.png"
    got = client.post("/search", files={"image": png(query)}, data={"k": "5"}).json()
    want = mindex.search_images(index, [query], 5, workers=0)[0]
    assert got["match"] == want["match"] and got["threshold"] == want["threshold"] and got["threshold"]["operating_point"] == "eer"
    assert [(h["path"], h["class"], h["match"]) for h in got["neighbours"]] == [(h["path"], h["class"], h["match"]) for h in want["neighbours"]]
    assert [h["score"] for h in got["neighbours"]] == pytest.approx([h["score"] for h in want["neighbours"]], abs=1e-5)
    assert [mindex.open_index_dir(index).paths[h["row"]] for h in got["neighbours"]] == [h["path"] for h in got["neighbours"]]

    a, b = folder / "class_01" / "0.png", folder / "class_05" / "3.png"
    vectors = model.embed([str(a), str(b)]).numpy()
    embedded = client.post("/embed", files={"image": png(a)}).json()
    assert embedded["dim"] == 16 and np.allclose(embedded["vector"], vectors[0], atol=1e-5)
    verdict = client.post("/verify", files={"image_a": png(a), "image_b": png(b)}).json()
    assert verdict["score"] == pytest.approx(float(vectors[0] @ vectors[1]), abs=1e-5)
    assert verdict["same"] == (verdict["score"] >= verdict["threshold"]["score"])

    info = client.get("/info").json()
    assert (info["count"], info["classes"], info["kind"], info["dim"]) == (28, 7, "flat", 16)
    assert info["model"] == model.fingerprint() and info["calibration"]["operating_point"] == "eer"
    assert client.get("/health").json() == {"status": "ok"}
    assert "/search" in client.get("/openapi.json").json()["paths"]
    thumb = client.get(f"/gallery/{got['neighbours'][0]['row']}/image")
    assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg" and thumb.content[:2] == b"\xff\xd8"


def test_enrol_search_remove_search_round_trip_and_mltk_search_agrees(client, index, trained_run):
    folder = trained_run[1]
    newcomer = sorted((folder / "class_09").glob("*.png"))
    query = newcomer[0]
    before = client.post("/search", files={"image": png(query)}, data={"k": "3"}).json()
    assert all(h["class"] != "Ada <script>" for h in before["neighbours"])

    said = client.post("/enrol", data={"name": "Ada <script>"}, files=[("images", png(p)) for p in newcomer[:3]]).json()
    assert said == {"class": "Ada <script>", "added": 3, "new_class": True, "count": 31, "classes": 8}
    after = client.post("/search", files={"image": png(query)}, data={"k": "3"}).json()
    assert after["neighbours"][0]["class"] == "Ada <script>" and after["neighbours"][0]["score"] == pytest.approx(1.0, abs=1e-4)
    cli = mindex.search_images(index, [query], 3, workers=0)[0]  # the directory on disk answers what the server does
    assert [(h["path"], h["class"]) for h in cli["neighbours"]] == [(h["path"], h["class"]) for h in after["neighbours"]]
    assert {"name": "Ada <script>", "images": 3} in client.get("/classes").json()

    removed = client.delete("/classes/Ada <script>").json()
    assert removed == {"class": "Ada <script>", "removed": 3, "count": 28, "classes": 7}
    again = client.post("/search", files={"image": png(query)}, data={"k": "3"}).json()
    assert again["neighbours"] == before["neighbours"]
    opened = mindex.open_index_dir(index)
    assert "Ada <script>" not in opened.classes and list((index / "enrolled").iterdir()) == []


def _bomb() -> bytes:
    """A PNG that is small on the wire and 400 megapixels decoded."""
    from PIL import Image

    out = io.BytesIO()
    Image.new("1", (20000, 20000)).save(out, format="PNG")
    return out.getvalue()


@pytest.mark.parametrize("request_, status, message", [
    (("post", "/search", {"files": {"image": ("a.txt", b"just text", "text/plain")}}), 415, "not an image of a type mltk decodes"),
    (("post", "/search", {"files": {"image": ("a.png", b"", "image/png")}}), 400, "is empty"),
    (("post", "/search", {"files": {"image": ("a.png", b"\x89PNG\r\n\x1a\n" + b"\0" * 40, "image/png")}}), 415, "not an image"),
    (("post", "/search", {"files": {"image": ("big.png", b"x" * 3000, "image/png")}}), 413, "the limit is 2048"),
    (("post", "/search", {"files": {"image": ("bomb.png", "BOMB", "image/png")}}), 413, "pixels"),
    (("post", "/search", {"files": {"image": "QUERY"}, "data": {"k": "0"}}), 400, "k=0: give 1 to 28"),
    (("post", "/search", {"files": {"image": "QUERY"}, "data": {"k": "many"}}), 422, "k:"),
    (("post", "/search", {}), 422, "image: Field required"),
    (("post", "/enrol", {"files": {"images": "QUERY"}, "data": {"name": "../x"}}), 400, "is a path, not a name"),
    (("post", "/enrol", {"files": {"images": "QUERY"}}), 422, "name: Field required"),
    (("delete", "/classes/nobody", {}), 404, "the gallery has no class 'nobody'"),
    (("get", "/gallery/28/image", {}), 404, "no gallery image '28'"),
    (("get", "/gallery/..%2F..%2Fetc%2Fpasswd/image", {}), 404, "Not Found"),
    (("get", "/gallery/..secret/image", {}), 404, "no gallery image"),
    (("get", "/gallery/-1/image", {}), 404, "no gallery image"),
    (("get", "/../../etc/passwd", {}), 404, "Not Found"),
    (("get", "/nowhere", {}), 404, "Not Found"),
])
def test_every_refusal_is_json_with_one_message_and_its_status(index, model, trained_run, request_, status, message):
    method, path, kwargs = request_
    query = png(trained_run[1] / "class_02" / "1.png")
    for key in ("files", "data"):
        for name, value in kwargs.get(key, {}).items():
            kwargs[key][name] = query if value == "QUERY" else ("bomb.png", _bomb(), "image/png") if value == ("bomb.png", "BOMB", "image/png") else value
    with client_for(index, model, max_bytes=2048 if "big.png" in str(kwargs) else 10 * 2**20) as client:
        response = getattr(client, method)(path, **kwargs)
    assert response.status_code == status, response.text
    body = response.json()
    assert list(body) == ["error"] and message in body["error"] and "\n" not in body["error"] and "Traceback" not in body["error"]
    assert mindex.open_index_dir(index).index.ntotal == 28


def test_a_token_guards_every_route_but_the_page(index, model):
    with client_for(index, model, host="0.0.0.0", token="s3cret") as client:
        assert client.get("/info").status_code == 401 and client.get("/info").json() == {"error": "this server needs 'Authorization: Bearer TOKEN'"}
        assert client.get("/info", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert client.delete("/classes/class_00").status_code == 401
        assert client.get("/info", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert client.get("/").status_code == 200 and client.get("/health").status_code == 200
    assert mindex.open_index_dir(index).classes[0] == "class_00"


def test_a_bind_beyond_the_loopback_without_a_token_is_one_line(index, mltk_main, monkeypatch):
    monkeypatch.delenv("MLTK_SERVE_TOKEN", raising=False)
    line = one_line_error(mltk_main("serve", index, "--host", "0.0.0.0"))
    assert "--host 0.0.0.0 lets other machines in: give --token SECRET" in line
    line = one_line_error(mltk_main("serve", index, "--port", "70000"))
    assert "--port 70000 is out of range" in line


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`mltk serve INDEX` in its own process, on a free loopback port."""

    def __init__(self, index: Path, *args: str, engine: str = "torch"):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "MLTK_LOAD_PLUGINS": ""}
        self.process = subprocess.Popen([sys.executable, "-m", "mltk", "serve", str(index), "--port", str(self.port), "--engine", engine, *args], cwd=REPO, env=env,
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        import httpx2 as httpx

        self.http = httpx.Client(base_url=self.url, timeout=60)
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                if self.http.get("/health").status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.2)
            assert self.process.poll() is None, self.process.communicate()
        raise AssertionError("mltk serve did not come up")

    def stop(self) -> None:
        self.http.close()
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
        self.process.communicate()


def test_enrolments_and_searches_run_concurrently_and_each_search_sees_a_whole_gallery(index, trained_run):
    folder = trained_run[1]
    server = Server(index)
    counts, problems = [], []
    try:
        def searcher() -> None:
            for _ in range(12):
                response = server.http.post("/search", files={"image": png(folder / "class_03" / "0.png")}, data={"k": "28"})
                if response.status_code != 200:
                    problems.append(response.text)
                    continue
                hits = response.json()["neighbours"]
                counts.append(len({h["row"] for h in hits}))
                if any(h["class"] == "visitor" and "enrolled" not in h["path"] for h in hits):
                    problems.append("a visitor's row points outside enrolled/")

        def editor() -> None:
            images = [("images", png(p)) for p in sorted((folder / "class_08").glob("*.png"))]
            for _ in range(3):
                for response in (server.http.post("/enrol", data={"name": "visitor"}, files=images), server.http.delete("/classes/visitor")):
                    if response.status_code != 200:
                        problems.append(response.text)

        threads = [threading.Thread(target=searcher) for _ in range(3)] + [threading.Thread(target=editor)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        server.stop()
    assert problems == [] and len(counts) == 36 and set(counts) == {28}
    assert mindex.open_index_dir(index).index.ntotal == 28


@pytest.mark.parametrize("delay", [0.0, 0.3, 1.0])
def test_a_kill_9_during_an_enrolment_leaves_the_index_before_or_after_it(index, trained_run, delay):
    folder = trained_run[1]
    server = Server(index)
    images = [("images", png(p)) for p in sorted(folder.glob("class_0[89]/*.png"))]
    sender = threading.Thread(target=lambda: _quietly(lambda: server.http.post("/enrol", data={"name": "late"}, files=images)))
    sender.start()
    time.sleep(delay)
    server.process.kill()  # SIGKILL, mid-enrolment or after it
    server.process.wait()
    sender.join()
    server.stop()
    opened = mindex.open_index_dir(index)  # opens: the directory checks pass
    assert (opened.index.ntotal, "late" in opened.classes) in ((28, False), (36, True))
    assert len(opened.paths) == len(opened.labels) == opened.index.ntotal
    restarted = Server(index)  # and it serves again
    try:
        assert restarted.http.get("/info").json()["count"] == opened.index.ntotal
    finally:
        restarted.stop()


def _quietly(call) -> None:
    try:
        call()
    except Exception:  # noqa: BLE001  the server was killed under the request
        pass


def test_the_page_searches_enrols_and_removes_in_a_real_browser(index, trained_run, tmp_path):
    from test_report import ARGS, CHROMIUM

    if not Path(CHROMIUM).is_file():
        pytest.fail(f"no Chromium at {CHROMIUM}: apt-get install chromium (Debian, Ubuntu), or set MLTK_TEST_CHROMIUM to a Chromium binary")
    from playwright.sync_api import expect, sync_playwright

    folder = trained_run[1]
    server = Server(index)
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=ARGS)
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            errors, outside = [], []
            page.on("pageerror", lambda error: errors.append(str(error)))
            page.on("console", lambda message: message.type == "error" and errors.append(message.text))
            page.on("request", lambda request: request.url.startswith((server.url, "blob:" + server.url, "data:")) or outside.append(request.url))
            page.on("dialog", lambda dialog: dialog.accept())
            page.on("response", lambda response: response.status >= 400 and errors.append(f"{response.status} {response.url}"))
            page.goto(server.url + "/")
            expect(page.locator("#info")).to_contain_text("28 images of 7 identities; flat index, 16 dimensions; threshold")

            page.set_input_files("#search-file", str(folder / "class_04" / "2.png"))
            expect(page.locator("#hits figure")).to_have_count(8)
            expect(page.locator("#hits figure").first).to_contain_text("class_04")
            expect(page.locator("#hits img[src^='blob:']")).to_have_count(8)
            expect(page.locator("#search-verdict")).to_contain_text("match")
            widths = page.eval_on_selector_all("#hits img", "imgs => imgs.map(i => i.naturalWidth)")
            assert len(widths) == 8 and min(widths) > 0  # the thumbnails loaded

            name = "<img src=x onerror=alert(1)>"
            page.fill("#enrol-name", name)
            page.set_input_files("#enrol-files", [str(p) for p in sorted((folder / "class_09").glob("*.png"))])
            page.click("#enrol")
            expect(page.locator("#enrol-result")).to_contain_text("enrolled 4 images of " + name)
            expect(page.locator("#info")).to_contain_text("32 images of 8 identities")
            assert page.locator("#classes img").count() == 0  # the name is text, not markup
            page.set_input_files("#search-file", str(folder / "class_09" / "1.png"))
            expect(page.locator("#hits .hit-class").first).to_have_text(name)
            expect(page.locator("#hits img[src^='blob:']")).to_have_count(8)  # every thumbnail fetched before the next edit

            page.locator("#classes li", has_text=name).get_by_role("button", name="Remove").click()
            expect(page.locator("#info")).to_contain_text("28 images of 7 identities")
            expect(page.locator("#classes li")).to_have_count(7)
            expect(page.locator("#hits figure")).to_have_count(0)  # results of the gallery before the edit are cleared

            page.set_input_files("#verify-a", str(folder / "class_01" / "0.png"))
            page.set_input_files("#verify-b", str(folder / "class_01" / "1.png"))
            page.click("#verify")
            expect(page.locator("#verify-result")).to_contain_text("score")

            page.set_input_files("#search-file", str(REPO / "README.md"))  # not an image: the server's message, shown
            expect(page.locator("#error")).to_contain_text("not an image of a type mltk decodes")
            assert errors == [] or all("415" in e for e in errors), errors  # the non-image upload's answer, and only it
            assert outside == []
            browser.close()
    finally:
        server.stop()
    assert "<img" not in json.dumps(mindex.open_index_dir(index).classes)


def test_auto_serves_with_onnx_runtime_only_where_it_agrees_with_pytorch_and_is_faster(index, model, trained_run):
    from mltk import serve

    with client_for(index, model, engine="auto") as client:
        engine = client.get("/info").json()["engine"]
        query = png(trained_run[1] / "class_02" / "1.png")
        hits = client.post("/search", files={"image": query}, data={"k": "5"}).json()["neighbours"]
    assert engine["agreement"] is not None and set(engine["timings_ms"]) == {"torch", "onnxruntime"}
    faster = min(engine["timings_ms"], key=lambda name: engine["timings_ms"][name]["total"])
    assert engine["name"] == (faster if engine["agreement"] <= serve.AGREEMENT else "torch")
    want = mindex.search_images(index, [trained_run[1] / "class_02" / "1.png"], 5, workers=0)[0]["neighbours"]
    assert [h["path"] for h in hits] == [h["path"] for h in want]
    assert [h["score"] for h in hits] == pytest.approx([h["score"] for h in want], abs=1e-5)
    probe = serve.probe_batch(model, mindex.open_index_dir(index))
    onnx = serve.choose_engine(model, "onnx", probe)
    assert onnx.name == "onnxruntime" and np.abs(onnx.embed_batch(probe) - serve.embedder_of(model)(probe)).max() <= serve.AGREEMENT


def test_the_batcher_embeds_concurrent_images_together_and_never_holds_a_lone_one():
    import torch

    from mltk.serve import Batcher

    sizes = []
    batcher = Batcher(lambda batch: sizes.append(len(batch)) or batch.numpy() * 2, max_batch=4, max_wait_ms=60_000)
    try:
        batcher.announce()
        lone = batcher.submit(torch.ones(3))
        assert lone.result(timeout=30).tolist() == [2.0, 2.0, 2.0]  # nothing else on the way: not held for the 60 s
        batcher.announce(3)  # three requests decoding: the first to arrive waits for the others
        futures = [batcher.submit(torch.full((3,), float(i))) for i in range(3)]
        assert [f.result(timeout=30)[0] for f in futures] == [0.0, 2.0, 4.0]
        assert sizes == [1, 3] and batcher.batches == 2 and batcher.coming == 0
        batcher.announce(5)
        futures = [batcher.submit(torch.zeros(3)) for _ in range(5)]
        [f.result(timeout=30) for f in futures]
        assert sizes[2:] == [4, 1]  # at most max_batch at a time
    finally:
        batcher.close()


def test_a_port_in_use_is_one_line_before_anything_loads(index, mltk_main):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        line = one_line_error(mltk_main("serve", index, "--port", port, "--engine", "torch"))
    assert f"cannot listen on 127.0.0.1:{port}" in line and "give another --port" in line
