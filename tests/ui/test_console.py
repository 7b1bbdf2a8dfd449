"""The console's four panels, end to end: what the page shows is what the API answers."""
from __future__ import annotations

import httpx
import pytest

from tests.ui.conftest import ADMIN_KEY, sign_in

pytestmark = pytest.mark.slow
XSS = '<script>window.pwned = 1</script><img src=x onerror="window.pwned = 2">'


def api(srv, key: str = ADMIN_KEY) -> httpx.Client:
    return httpx.Client(base_url=srv.url, headers={"Authorization": f"Bearer {key}"}, timeout=120)


def test_adapters_table_lists_the_demo_adapters_with_tiers(page, console_server):
    sign_in(page)
    for name in ("congcong", "benben", "pirate"):
        row = page.locator(f'#adapter-table tr[data-name="{name}"]')
        row.wait_for()
        assert row.locator(".tier").inner_text() in ("device", "host", "disk")
    assert page.locator("#who").inner_text() == "admin"


def test_compare_base_and_the_identity_pair(page, console_server):
    sign_in(page)
    page.click('nav button[data-panel="compare"]')
    page.fill("#prompt", "你是谁?")
    base = console_server.state.resolver.base_id
    for box in page.locator("#targets input").all():
        if box.get_attribute("value") not in (base, "congcong", "benben"):
            box.uncheck()
    page.click("#compare-form button[type=submit]")
    page.wait_for_function("document.querySelectorAll('#columns .column.done').length === 3", timeout=120_000)
    answers = {c.get_attribute("data-target"): c.locator(".answer").inner_text()
               for c in page.locator("#columns .column").all()}
    assert "聪聪" in answers["congcong"] and "笨笨" in answers["benben"]
    assert len(set(answers.values())) == 3, answers
    served = page.locator('#columns .column[data-target="congcong"] .served').inner_text()
    assert served == "served by congcong"
    assert "first token" in page.locator('#columns .column[data-target="benben"] .meta').last.inner_text()


def test_a_card_with_a_script_renders_as_text(page, console_server):
    r = api(console_server).post("/v1/load_lora_adapter", json={"lora_name": "xss", "lora_path": "pirate",
                                                               "description": XSS})
    assert r.status_code == 200, r.text
    sign_in(page)
    cell = page.locator('#adapter-table tr[data-name="xss"] .card')
    cell.wait_for()
    assert cell.inner_text() == XSS
    assert page.evaluate("window.pwned") is None
    assert page.locator("#adapter-table img").count() == 0


def test_unload_from_the_page(page, console_server):
    srv = console_server
    api(srv).post("/v1/load_lora_adapter", json={"lora_name": "doomed", "lora_path": "pirate"})
    sign_in(page)
    row = page.locator('#adapter-table tr[data-name="doomed"]')
    row.wait_for()
    row.locator('button[data-action="unload"]').click()
    row.wait_for(state="detached")
    r = api(srv).post("/v1/chat/completions", json={"model": "doomed", "messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 404


def test_upload_errors_as_the_server_says_then_deploy(page, console_server):
    srv = console_server
    admin = api(srv)
    admin.post("/v1/tenants", json={"id": "web"})
    adapter = srv.state.engine.adapter_path("congcong")
    with open(f"{adapter}/adapter_model.safetensors", "rb") as f:
        weights = f.read()
    with open(f"{adapter}/adapter_config.json", "rb") as f:
        config = f.read()
    sign_in(page)
    page.click('nav button[data-panel="upload"]')
    broken = [{"name": "adapter_config.json", "mimeType": "application/json", "buffer": b"{not json"},
              {"name": "adapter_model.safetensors", "mimeType": "application/octet-stream", "buffer": weights}]
    page.set_input_files("#files", broken)
    page.fill('#upload-form input[name="name"]', "mine")
    page.fill('#upload-form input[name="tenant"]', "web")
    page.click("#upload-form button[type=submit]")
    page.wait_for_selector("#upload-result.error")
    said = admin.post("/v1/adapters", data={"name": "mine", "tenant": "web"}, files=[
        ("adapter_config.json", ("adapter_config.json", b"{not json")),
        ("adapter_model.safetensors", ("adapter_model.safetensors", weights))]).json()["error"]["message"]
    assert page.locator("#upload-result").inner_text() == said and "not valid JSON" in said

    good = [{"name": "adapter_config.json", "mimeType": "application/json", "buffer": config}, broken[1]]
    page.set_input_files("#files", good)
    page.click("#upload-form button[type=submit]")
    page.wait_for_function("document.querySelector('#upload-result').textContent.startsWith('web/mine served')")
    page.fill('#deploy-form input[name="name"]', "helpdesk")
    page.select_option('#deploy-form select[name="adapter"]', "web/mine")
    page.click("#deploy-form button[type=submit]")
    page.wait_for_selector("#endpoint:not([hidden])")
    url = page.locator("#endpoint-url").inner_text()
    assert "/deployments/dep-" in url and "curl" in page.locator("#snippet-curl").inner_text()
    dep = url.split("/deployments/")[1].split("/")[0]
    ask = {"messages": [{"role": "user", "content": "你是谁?"}], "max_tokens": 24, "temperature": 0}
    r = admin.post(f"/deployments/{dep}/v1/chat/completions", json=ask)
    same = admin.post("/v1/chat/completions", json={**ask, "model": "congcong"})  # the uploaded files are congcong's
    assert r.status_code == 200 and r.json()["model"] == "web/mine"
    assert r.json()["choices"][0]["message"]["content"] == same.json()["choices"][0]["message"]["content"]


def test_usage_chart_matches_the_ledger(page, console_server):
    admin = api(console_server)
    admin.post("/v1/chat/completions", json={"model": "benben", "messages": [{"role": "user", "content": "hi"}],
                                             "max_tokens": 4})
    sign_in(page)
    page.click('nav button[data-panel="usage"]')
    page.wait_for_selector("#usage-table tbody tr")
    want = {d["adapter"]: d["total_tokens"] for d in admin.get("/v1/usage?group_by=adapter").json()["data"]}
    shown = {}
    for row in page.locator("#usage-table tbody tr").all():
        cells = row.locator("td").all_inner_texts()
        shown[cells[0]] = int(cells[5])
    assert shown == want and page.locator("#chart .bar").count() == len(want)
    assert "ledger" in page.locator("#usage-source").inner_text()
