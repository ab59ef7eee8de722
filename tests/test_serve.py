"""The JSON API on real images: predictions, search, bad uploads (always 4xx), and concurrent clients."""
import io
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from devise.predict import predict
from devise.search import build_index
from devise.serve import create_app, running_server


@pytest.fixture(scope="module")
def files(tmp_path_factory, foolbox_photos):
    import skimage.data

    folder = tmp_path_factory.mktemp("serve")
    photos = folder / "photos"
    photos.mkdir()
    Image.fromarray(skimage.data.chelsea()).save(photos / "chelsea.jpg", quality=95)
    Image.fromarray(skimage.data.coffee()).save(photos / "coffee.jpg", quality=95)
    for p in foolbox_photos[:6]:
        (photos / p.name).write_bytes(p.read_bytes())
    index = build_index(photos, out=folder / "photos.index", progress=False)
    return {"folder": folder, "chelsea": photos / "chelsea.jpg", "coffee": photos / "coffee.jpg",
            "index": index.folder}


@pytest.fixture(scope="module")
def client(files):
    return TestClient(create_app(index=files["index"], max_upload_bytes=2 * 1024 * 1024))


def _upload(client, name, data, k=5):
    return client.post(f"/api/predict?k={k}", files={"image": (name, data, "application/octet-stream")})


def test_predict_answers_the_same_object_as_the_cli(client, files):
    response = _upload(client, "chelsea.jpg", files["chelsea"].read_bytes())
    assert response.status_code == 200
    body = response.json()
    [expected] = predict([files["chelsea"]])
    assert body["image"] == "chelsea.jpg"
    assert [p["label"] for p in body["predictions"]] == [p["label"] for p in expected["predictions"]]
    assert [p["synset"] for p in body["predictions"]] == [p["synset"] for p in expected["predictions"]]
    np.testing.assert_allclose([p["score"] for p in body["predictions"]],
                               [p["score"] for p in expected["predictions"]], atol=1e-4)
    assert any("cat" in p["label"].split() for p in body["predictions"])
    assert len(_upload(client, "coffee.jpg", files["coffee"].read_bytes(), k=12).json()["predictions"]) == 12


def test_search_and_image_route(client, files):
    response = client.get("/api/search", params={"q": "cat", "k": 3})
    assert response.status_code == 200
    body = response.json()
    assert body["query"] == "cat" and len(body["results"]) == 3
    assert body["results"][0]["image"] == str(files["chelsea"].resolve())
    image = client.get("/api/image", params={"path": body["results"][0]["image"]})
    assert image.status_code == 200 and image.content == files["chelsea"].read_bytes()
    # nothing outside the index is ever served
    for path in ("/etc/passwd", str(files["folder"] / "photos.index" / "meta.json"), "../photos/chelsea.jpg"):
        assert client.get("/api/image", params={"path": path}).status_code == 404
    assert client.get("/api/search", params={"q": "qzxvbnmw"}).status_code == 400
    assert client.get("/api/search", params={"q": ""}).status_code == 422
    assert client.get("/api/search", params={"q": "cat", "k": 0}).status_code == 422


def test_page_info_and_openapi(client):
    page = client.get("/")
    assert page.status_code == 200 and "<title>devise" in page.text
    info = client.get("/api/info").json()
    assert info["model"] == "conse" and info["index"] == 8 and info["labels"] > 70_000
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/api/predict", "/api/search", "/api/image", "/api/info"} <= set(paths)


def _png_bytes(image):
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def test_bad_uploads_are_4xx_with_a_clear_message(client, files):
    jpeg = files["chelsea"].read_bytes()
    cases = {
        "text file": (_upload(client, "notes.txt", b"hello, I am not an image\n"), 415, "not an image"),
        "empty": (_upload(client, "empty.jpg", b""), 400, "empty"),
        "truncated": (_upload(client, "cut.jpg", jpeg[:len(jpeg) // 3]), 400, "truncated"),
        "too large": (_upload(client, "big.jpg", jpeg + b"\0" * (2 * 1024 * 1024)), 413, "limit"),
        # 30000 x 30000 one-bit pixels compress to ~100 KB and would expand to 900 megapixels
        "bomb": (_upload(client, "bomb.png", _png_bytes(Image.new("1", (30000, 30000)))), 413, "decompression bomb"),
        "no field": (client.post("/api/predict", files={"other": ("a.jpg", jpeg)}), 422, ""),
    }
    for name, (response, status, words) in cases.items():
        assert response.status_code == status, (name, response.text)
        assert words in response.json()["detail"] if words else True, (name, response.text)
    # an oversized body is refused from its Content-Length before it is read
    big = client.post("/api/predict", content=b"x" * (3 * 1024 * 1024),
                      headers={"content-type": "multipart/form-data; boundary=abc"})
    assert big.status_code == 413


def test_no_index_loaded_is_a_404(files):
    client = TestClient(create_app())
    assert client.get("/api/search", params={"q": "cat"}).status_code == 404
    assert client.get("/api/info").json()["index"] is None


def test_concurrent_clients_on_a_live_server(files):
    """8 clients x 25 requests against uvicorn on 127.0.0.1: every one answered, and correctly."""
    app = create_app(index=files["index"], vocab="imagenet1k")
    chelsea, coffee = files["chelsea"].read_bytes(), files["coffee"].read_bytes()
    with running_server(app) as url:
        with httpx.Client(base_url=url, timeout=60) as c:
            expected_cat = c.post("/api/predict", files={"image": ("c.jpg", chelsea)}).json()["predictions"]
            expected_coffee = c.post("/api/predict", files={"image": ("e.jpg", coffee)}).json()["predictions"]
            expected_search = c.get("/api/search", params={"q": "cat"}).json()

        def client_run(worker: int) -> list:
            ok = []
            with httpx.Client(base_url=url, timeout=120) as c:
                for i in range(25):
                    try:
                        ok.append(request(c, worker, i))
                    except httpx.HTTPError as exc:  # recorded, so a failure says what happened
                        ok.append(repr(exc))
            return ok

        def request(c, worker: int, i: int) -> bool:
            kind = (worker + i) % 3
            if kind == 0:
                r = c.post("/api/predict", files={"image": ("c.jpg", chelsea)})
                return r.status_code == 200 and r.json()["predictions"] == expected_cat
            if kind == 1:
                r = c.post("/api/predict", files={"image": ("e.jpg", coffee)})
                return r.status_code == 200 and r.json()["predictions"] == expected_coffee
            r = c.get("/api/search", params={"q": "cat"})
            return r.status_code == 200 and r.json() == expected_search

        with ThreadPoolExecutor(8) as pool:
            results = [ok for worker in pool.map(client_run, range(8)) for ok in worker]
    assert len(results) == 200 and all(r is True for r in results), [r for r in results if r is not True][:5]
    assert expected_coffee[0]["label"] == "espresso"
