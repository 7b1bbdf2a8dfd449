"""Malformed, hostile or oversize uploads are refused with the reason, and nothing of them is stored."""
from __future__ import annotations

import io
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.platform.conftest import Client, files_of, make_tenant, tar_of, zip_of

CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"


@pytest.fixture(scope="module")
def tenant(platform, admin):
    return Client(platform.url, make_tenant(admin, "uploader"))


def stored(data_dir) -> list[str]:
    return sorted(p.name for p in (data_dir / "adapters").iterdir())


def _wrong_shapes(folder) -> bytes:
    tensors = load_file(folder / WEIGHTS)
    key = next(k for k in tensors if "lora_A" in k)
    tensors[key] = torch.zeros(tensors[key].shape[0], tensors[key].shape[1] + 8)
    buf = io.BytesIO()
    path = folder.parent / "wrong.safetensors"
    save_file(tensors, path)
    buf.write(path.read_bytes())
    return buf.getvalue()


def _nan(folder) -> bytes:
    tensors = load_file(folder / WEIGHTS)
    key = next(k for k in tensors if "lora_B" in k)
    tensors[key][0, 0] = float("nan")
    path = folder.parent / "nan.safetensors"
    save_file(tensors, path)
    return path.read_bytes()


def cases(folder):
    config, weights = (folder / CONFIG).read_bytes(), (folder / WEIGHTS).read_bytes()
    bad_rank = json.dumps({**json.loads(config), "r": 4096}).encode()
    return {
        "wrong shapes": ({"files": [(CONFIG, (CONFIG, config)), (WEIGHTS, (WEIGHTS, _wrong_shapes(folder)))]},
                         "do not fit the base"),
        "pickle .bin": ({"files": [(CONFIG, (CONFIG, config)), ("w", ("adapter_model.bin", b"\x80\x04pickle"))]},
                        "pickle"),
        "truncated safetensors": ({"files": [(CONFIG, (CONFIG, config)), (WEIGHTS, (WEIGHTS, weights[:len(weights) // 2]))]},
                                  "adapter"),
        "not safetensors": ({"files": [(CONFIG, (CONFIG, config)), (WEIGHTS, (WEIGHTS, b"hello"))]}, "adapter"),
        "non-finite weights": ({"files": [(CONFIG, (CONFIG, config)), (WEIGHTS, (WEIGHTS, _nan(folder)))]},
                               "non-finite"),
        "rank over the limit": ({"files": [(CONFIG, (CONFIG, bad_rank)), (WEIGHTS, (WEIGHTS, weights))]},
                                "max_lora_rank"),
        "config only": ({"files": [(CONFIG, (CONFIG, config))]}, "no adapter_model.safetensors"),
        "bad JSON config": ({"files": [(CONFIG, (CONFIG, b"{nope")), (WEIGHTS, (WEIGHTS, weights))]}, "adapter"),
        "bad card": ({"files": [(CONFIG, (CONFIG, config)), (WEIGHTS, (WEIGHTS, weights)),
                                ("adapter_card.json", ("adapter_card.json", b'{"examples": "one string"}'))]},
                     "adapter_card.json"),
        "other file name": ({"files": [(CONFIG, (CONFIG, config)), ("x", ("model.py", b"import os"))]},
                            "not one of"),
        "zip slip": ({"files": {"archive": ("a.zip", zip_of({f"../{CONFIG}": config, WEIGHTS: weights}))}}, "path"),
        "tar absolute path": ({"files": {"archive": ("a.tgz", tar_of({f"/tmp/{CONFIG}": config, WEIGHTS: weights}))}},
                              "path"),
        "tar deep path": ({"files": {"archive": ("a.tgz", tar_of({f"a/b/{CONFIG}": config, WEIGHTS: weights}))}},
                          "path"),
        "tar symlink": ({"files": {"archive": ("a.tgz", tar_of({CONFIG: config}, {WEIGHTS: "/etc/passwd"}))}},
                        "not a regular file"),
        "zip bomb": ({"files": {"archive": ("a.zip", zip_of({CONFIG: config, WEIGHTS: b"\0" * (5 << 20)}))}},
                     "larger than the cap"),
        "not an archive": ({"files": {"archive": ("a.tar.gz", b"not gzip at all")}}, "not a readable tar"),
    }


BAD = ["wrong shapes", "pickle .bin", "truncated safetensors", "not safetensors", "non-finite weights",
       "rank over the limit", "config only", "bad JSON config", "bad card", "other file name", "zip slip",
       "tar absolute path", "tar deep path", "tar symlink", "zip bomb", "not an archive"]


@pytest.mark.parametrize("case", BAD)
def test_bad_upload_is_400_and_stores_nothing(tenant, adapter_dir, data_dir, case):
    before = stored(data_dir)
    kwargs, reason = cases(adapter_dir / "a4")[case]
    r = tenant.post("/v1/adapters", data=kwargs.get("data", {"name": "bad"}), files=kwargs["files"])
    assert r.status_code == 400, (case, r.text)
    err = r.json()["error"]
    assert reason in err["message"] and err["param"] == "file", (case, err)
    assert str(data_dir) not in err["message"]  # no server path in the answer
    assert stored(data_dir) == before
    assert tenant.get("/v1/adapters/bad").status_code == 404


def test_oversize_body_is_413(tenant, data_dir):
    before = stored(data_dir)
    r = tenant.post("/v1/adapters", data={"name": "huge"}, files={"archive": ("a.zip", b"\0" * (5 << 20))})
    assert r.status_code == 413
    assert stored(data_dir) == before


def test_names_and_conflicts(tenant, adapter_dir):
    files = files_of(adapter_dir / "a4")
    r = tenant.post("/v1/adapters", data={"name": "../evil"}, files=files)
    assert r.status_code == 400 and r.json()["error"]["param"] == "name"
    r = tenant.post("/v1/adapters", files=files)
    assert r.status_code == 400 and r.json()["error"]["param"] == "name"
    assert tenant.post("/v1/adapters", data={"name": "once"}, files=files).status_code == 201
    r = tenant.post("/v1/adapters", data={"name": "once"}, files=files)
    assert r.status_code == 409 and r.json()["error"]["code"] == "adapter_exists"
    r = tenant.post("/v1/adapters", content=b"{}", headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "content-type"


def test_raw_archive_body(tenant, adapter_dir):
    body = zip_of({n: (adapter_dir / "a8" / n).read_bytes() for n in (CONFIG, WEIGHTS)})
    r = tenant.post("/v1/adapters", params={"name": "raw"}, content=body, headers={"content-type": "application/zip"})
    assert r.status_code == 201, r.text
    assert tenant.post("/v1/completions", json={"model": "uploader/raw", "prompt": "hi", "max_tokens": 2}
                       ).status_code == 200
