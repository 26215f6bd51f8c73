"""The web console in a real browser: Playwright driving Debian's Chromium (never a browser
build of Playwright's own; `make test` installs chromium with apt) against real servers on the
tiny random model. Screenshots of each screen go to test-artifacts/console/ (and, with
CONSOLE_SCREENSHOTS_TO_DOCS=1, to docs/img/ for the README)."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import signal
import threading
import zipfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.evaluation.conftest import make_data_dir
from tests.server.conftest import REPO_ROOT, Server, start_server, stop_server

sync_api = pytest.importorskip("playwright.sync_api")
peft = pytest.importorskip("peft")

CHROMIUM = os.environ.get("CONSOLE_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
if not Path(CHROMIUM).exists():
    pytest.skip(
        f"no chromium at {CHROMIUM}: the console's browser tests drive Debian's chromium "
        "(`make test` installs it with apt-get install chromium where it can)",
        allow_module_level=True,
    )

LAUNCH_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ARTIFACTS = REPO_ROOT / "test-artifacts" / "console"
DOCS_IMG = REPO_ROOT / "docs" / "img"
DOCS_SCREENS = ("adapters", "playground", "evaluations", "metrics", "narrow")
BASE = "tiny"
USER_KEY, ADMIN_KEY = "user-key", "admin-key"
XSS = "<img src=x onerror=window.__xss=1>"
XSS_REGEX = "<img src=x onerror=window\\.__xss=1>"
TIMEOUT_MS = 60_000
expect = sync_api.expect
expect.set_options(timeout=TIMEOUT_MS)  # a shared 2-core machine is slow


# ---------------------------------------------------------------- servers and the browser


@pytest.fixture(scope="module")
def work(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from tests.adapters.makers import save_peft

    root = tmp_path_factory.mktemp("console")
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    ia3 = peft.IA3Config(
        target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]
    )
    data = make_data_dir(root / "data", size=6)
    make_data_dir(root / "big-data", size=60)
    shutil.copytree(root / "big-data" / "gsm8k", data / "MultiArith")  # for the cancelled job
    return {
        "root": root,
        "data": data,
        "lora-a": save_peft(root / "lora-a", tiny_model_dir, lora, 1),
        "lora-b": save_peft(root / "lora-b", tiny_model_dir, lora, 2),
        "ia3": save_peft(root / "ia3", tiny_model_dir, ia3, 3),
    }


@pytest.fixture(scope="module")
def server(tiny_model_dir: Path, work: dict[str, Path]) -> Iterator[Server]:
    srv = start_server(
        tiny_model_dir,
        work["root"] / "server.log",
        "--served-model-name",
        BASE,
        "--adapter",
        f"lora-b={work['lora-b']}",
        "--data-dir",
        str(work["data"]),
        "--max-model-len",
        "512",
        "--max-num-seqs",
        "16",
    )
    yield srv
    status = stop_server(srv)
    assert "Traceback" not in srv.log(), srv.log()[-4000:]
    assert status in (0, -signal.SIGTERM)


@pytest.fixture(scope="module")
def browser() -> Iterator:
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=LAUNCH_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser, server: Server) -> Iterator:
    context = browser.new_context(
        viewport={"width": 1280, "height": 860}, base_url=server.base_url, accept_downloads=True
    )
    context.set_default_timeout(TIMEOUT_MS)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    yield page
    context.close()
    assert not errors, errors


def screenshot(page, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)
    if os.environ.get("CONSOLE_SCREENSHOTS_TO_DOCS") == "1" and name in DOCS_SCREENS:
        DOCS_IMG.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(DOCS_IMG / f"console-{name}.png"))


def open_tab(page, tab: str) -> None:
    """Also on the page already open: a new #hash alone switches the tab (no reload)."""
    page.goto(f"/ui/#{tab}")
    expect(page.locator("#server-status")).to_contain_text(BASE)
    expect(page.locator(f"#tab-{tab}")).to_be_visible()


def assert_no_injection(page) -> None:
    """Nothing the server sent became markup: no <img> anywhere, the flag never set."""
    assert page.locator("img").count() == 0
    assert page.evaluate("window.__xss") is None


def adapter_files(folder: Path) -> list[str]:
    return [str(folder / "adapter_config.json"), str(folder / "adapter_model.safetensors")]


def accept_dialogs(page, seen: list[str]) -> None:
    def accept(dialog) -> None:
        seen.append(dialog.message)
        dialog.accept()

    page.on("dialog", accept)


# ---------------------------------------------------------------- adapters


def test_upload_through_the_page_lists_the_adapter(page, server: Server, work: dict) -> None:
    open_tab(page, "adapters")
    expect(page.locator("#base-card")).to_contain_text("vocabulary")
    expect(page.locator('#adapters-table tr[data-name="lora-b"]')).to_be_visible()
    page.fill("#upload-name", "lora-a")
    page.set_input_files(
        "#upload-files", [*adapter_files(work["lora-a"]), str(work["root"] / "server.log")]
    )
    expect(page.locator("#upload-chosen")).to_contain_text("left out")  # server.log is not sent
    page.click("#upload-send")
    expect(page.locator("#upload-status")).to_contain_text("Uploaded lora-a: lora, rank 4, version")
    row = page.locator('#adapters-table tr[data-name="lora-a"]')
    expect(row).to_be_visible()
    card = httpx.get(f"{server.base_url}/v1/adapters/lora-a").json()
    assert (card["kind"], card["rank"], card["targets"]) == ("lora", 4, ["q", "v"])
    cells = row.locator("td").all_text_contents()
    assert cells[:8] == [
        "lora-a",
        "lora",
        "4",
        "q, v",
        "7.0 KiB",
        card["tier"],
        str(card["version"]),
        "upload",
    ]
    screenshot(page, "adapters")


def test_drop_an_archive_then_replace_and_delete(page, server: Server, work: dict) -> None:
    """A drop (a DataTransfer built in the page, as a drag from the desktop delivers it) of a
    .zip; then Replace with files and Delete, each after a confirmation."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for path in adapter_files(work["ia3"]):
            archive.write(path, f"ia3/{Path(path).name}")
    open_tab(page, "adapters")
    page.evaluate(
        """([name, data]) => {
            const bytes = Uint8Array.from(atob(data), (c) => c.charCodeAt(0));
            const transfer = new DataTransfer();
            transfer.items.add(new File([bytes], name, { type: 'application/zip' }));
            document.querySelector('#drop-zone').dispatchEvent(
                new DragEvent('drop', { dataTransfer: transfer, bubbles: true, cancelable: true }));
        }""",
        ["my-ia3.zip", base64.b64encode(buffer.getvalue()).decode()],
    )
    expect(page.locator("#upload-name")).to_have_value("my-ia3")  # named after the archive
    page.click("#upload-send")
    expect(page.locator("#upload-status")).to_contain_text("Uploaded my-ia3: ia3")
    dialogs: list[str] = []
    accept_dialogs(page, dialogs)
    row = page.locator('#adapters-table tr[data-name="my-ia3"]')
    with page.expect_file_chooser() as chooser:
        row.locator("button.replace").click()
    chooser.value.set_files(adapter_files(work["lora-a"]))
    expect(page.locator("#adapters-status")).to_contain_text(
        "Replaced my-ia3: lora, rank 4, version"
    )
    expect(row.locator("td").nth(1)).to_have_text("lora")
    row.locator("button.delete").click()
    expect(page.locator("#adapters-status")).to_contain_text("Deleted my-ia3.")
    expect(row).to_have_count(0)
    assert "Replace the adapter my-ia3" in dialogs[0] and "Delete the adapter my-ia3" in dialogs[1]
    assert httpx.get(f"{server.base_url}/v1/adapters/my-ia3").status_code == 404


def test_choose_a_folder(page, server: Server, work: dict) -> None:
    """The folder picker: named after the folder, only the adapter's files are sent."""
    folder = work["root"] / "picked" / "folder-lora"
    shutil.copytree(work["lora-b"], folder)
    (folder / "training_args.bin").write_bytes(b"not sent")
    open_tab(page, "adapters")
    page.set_input_files("#upload-folder", str(folder))
    expect(page.locator("#upload-name")).to_have_value("folder-lora")
    expect(page.locator("#upload-chosen")).to_contain_text("left out")
    expect(page.locator("#upload-chosen")).to_contain_text("training_args.bin")
    page.click("#upload-send")
    expect(page.locator("#upload-status")).to_contain_text("Uploaded folder-lora: lora")
    assert httpx.get(f"{server.base_url}/v1/adapters/folder-lora").status_code == 200


def test_an_adapter_name_with_markup_is_shown_as_text(page, work: dict) -> None:
    """Names allow no markup: the server refuses this one, and its message (which quotes the
    name) is shown as it is, as text."""
    open_tab(page, "adapters")
    page.fill("#upload-name", XSS)
    page.set_input_files("#upload-files", adapter_files(work["lora-a"]))
    page.click("#upload-send")
    status = page.locator("#upload-status")
    expect(status).to_contain_text("invalid adapter name")
    expect(status).to_contain_text(XSS)
    assert_no_injection(page)


# ---------------------------------------------------------------- playground


def api_completion(server: Server, model: str, **body) -> str:
    body = {"model": model, "prompt": "Once upon a time", "max_tokens": 12, "temperature": 0} | body
    response = httpx.post(f"{server.base_url}/v1/completions", json=body, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["text"]


def run_playground(page, models: list[str], max_tokens: int, extra: str = "") -> dict[str, str]:
    if not page.url.endswith("#playground"):
        open_tab(page, "playground")
    boxes = page.locator("#play-models input")
    expect(boxes.first).to_be_visible()
    for box in boxes.all():
        box.set_checked(box.get_attribute("value") in models)
    page.fill("#play-max-tokens", str(max_tokens))
    page.fill("#play-extra", extra)
    page.click("#play-send")
    expect(page.locator(".column.done")).to_have_count(len(models))
    expect(page.locator("#play-status")).to_contain_text("done in")
    return {
        model: page.locator(f'.column[data-model="{model}"] pre.output').text_content()
        for model in models
    }


def test_playground_streams_three_answers_equal_to_the_api(page, server: Server) -> None:
    models = [BASE, "lora-a", "lora-b"]
    texts = run_playground(page, models, max_tokens=12)
    for model in models:
        assert texts[model] == api_completion(server, model), model
        assert page.locator(f'.column[data-model="{model}"] .error').text_content() == ""
    assert len(set(texts.values())) == 3  # the adapters change the answers
    stats = page.locator(".column .stats")
    for i in range(3):
        assert re.search(
            r"TTFT \d+\.\d+ s · 12 tokens · (\d+\.\d|-) tok/s", stats.nth(i).text_content()
        )
    screenshot(page, "playground")


def test_playground_chat_mode(page, server: Server) -> None:
    open_tab(page, "playground")
    page.check('input[name="play-mode"][value="chat"]')
    texts = run_playground(page, [BASE], max_tokens=8)
    body = {
        "model": BASE,
        "messages": [{"role": "user", "content": "Once upon a time"}],
        "max_tokens": 8,
        "temperature": 0,
    }
    answer = httpx.post(f"{server.base_url}/v1/chat/completions", json=body, timeout=60).json()
    assert texts[BASE] == answer["choices"][0]["message"]["content"]


def test_model_output_with_markup_is_shown_as_text(page) -> None:
    """The model is held to a regex that spells an <img> with an onerror handler."""
    extra = json.dumps({"guided_regex": XSS_REGEX})
    texts = run_playground(page, ["lora-a"], max_tokens=64, extra=extra)
    assert texts["lora-a"] == XSS
    assert_no_injection(page)


def test_a_refused_request_shows_the_servers_message(page) -> None:
    texts = run_playground(page, [BASE], max_tokens=8, extra='{"temperature": 9}')
    assert texts[BASE] == ""
    expect(page.locator(".column .error")).to_contain_text("temperature")


# ---------------------------------------------------------------- evaluations


def test_evaluation_job_finishes_with_its_table(page, server: Server) -> None:
    """Protocol loglikelihood (a random model scores near chance, not 0), and a dataset
    registered with markup in its instructions: the rows show it as text."""
    records = [
        {"instruction": f"{XSS} Is {i} even? Answer yes or no.", "answer": "yes"} for i in range(2)
    ]
    body = {
        "name": "xss-set",
        "answer_kind": "words",
        "answer_words": ["yes", "no"],
        "records": records,
    }
    assert httpx.post(f"{server.base_url}/v1/datasets", json=body).status_code == 201
    open_tab(page, "evaluations")
    for model in ("base", "lora-a"):
        page.locator(f'#eval-models input[value="{model}"]').check()
    for dataset in ("boolq", "piqa", "xss-set"):
        page.locator(f'#eval-datasets input[value="{dataset}"]').check()
    page.fill("#eval-limit", "2")
    page.select_option("#eval-protocol", "loglikelihood")
    page.click("#eval-start")
    expect(page.locator("#eval-detail")).to_have_attribute("data-status", "succeeded")
    job_id = page.locator("#eval-title").text_content().split(" ")[0]
    job = httpx.get(f"{server.base_url}/v1/evaluations/{job_id}").json()
    assert job["status"] == "succeeded" and job["progress"]["done"] == 12
    header = page.locator("#eval-table thead th").all_text_contents()
    assert header == ["model", "boolq", "piqa", "xss-set", "Average"]
    table = [
        row.locator("th, td").all_text_contents()
        for row in page.locator("#eval-table tbody tr").all()
    ]
    assert table == expected_table(job)
    expect(page.locator("#eval-rows tbody tr")).to_have_count(12)
    expect(page.locator("#eval-chart svg rect")).to_have_count(8)  # 2 models x (3 sets + Average)
    expect(page.locator("#eval-rows")).to_contain_text(XSS)
    assert_no_injection(page)
    with page.expect_download() as download:
        page.click("#eval-csv")
    csv_text = Path(download.value.path()).read_text()
    assert csv_text.splitlines() == [",".join(row) for row in [header, *expected_table(job)]]
    with page.expect_download() as download:
        page.click("#eval-rows-jsonl")
    assert len(Path(download.value.path()).read_text().splitlines()) == 12
    page.select_option("#rows-model", "lora-a")
    expect(page.locator("#eval-rows tbody tr")).to_have_count(6)
    screenshot(page, "evaluations")


def expected_table(job: dict) -> list[list[str]]:
    from adapterserve.server.evaluation.report import accuracy_table

    return accuracy_table(job)[1]


def test_cancel_a_running_job(page, server: Server) -> None:
    open_tab(page, "evaluations")
    page.locator('#eval-datasets input[value="MultiArith"]').check()
    page.fill("#eval-limit", "60")
    page.fill("#eval-max-tokens", "64")
    page.click("#eval-start")
    expect(page.locator("#eval-form-status")).to_contain_text("Started")
    expect(page.locator("#eval-table tbody progress")).to_have_count(1)  # the cell's progress
    page.once("dialog", lambda dialog: dialog.accept())
    page.click("#eval-cancel")
    expect(page.locator("#eval-detail")).to_have_attribute("data-status", "cancelled")
    expect(page.locator("#eval-cancel")).to_be_disabled()


# ---------------------------------------------------------------- fine-tuning


def training_file(folder: Path, name: str, lines: list[str]) -> str:
    path = folder / name
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def good_records(n: int = 8) -> list[str]:
    return [
        json.dumps({"instruction": f"Add {i} and {i}.", "input": "", "output": f"{2 * i}"})
        for i in range(n)
    ]


def upload_training_file(page, path: str) -> str:
    page.set_input_files("#ft-file-input", path)
    page.click("#ft-file-upload")
    status = page.locator("#ft-file-status")
    expect(status).to_have_class(re.compile(r"\b(ok|error)\b"))
    return status.text_content()


def fill_job_form(page, **fields: str) -> None:
    """The recipe for a fast job on the tiny model, then `fields` (form ids without `ft-`)."""
    page.click("#ft-form details summary")
    values = {"epochs": "1", "batch-size": "2", "micro-batch": "2", "cutoff": "64"} | fields
    for name, value in values.items():
        page.fill(f"#ft-{name}", value)


def start_job(page) -> str:
    page.click("#ft-start")
    expect(page.locator("#ft-form-status")).to_contain_text("Started ftjob-")
    return page.locator("#ft-form-status").text_content().split(" ")[1].rstrip(".")


def test_a_bad_training_file_shows_the_line(page, work: dict) -> None:
    """Line 3 is not JSON: the server's 400 names it, and nothing is stored."""
    lines = [*good_records(2), "{not json", *good_records(2)]
    open_tab(page, "finetune")
    text = upload_training_file(page, training_file(work["root"], "bad.jsonl", lines))
    assert text.startswith("bad.jsonl: Invalid training file: line 3: not a JSON object"), text
    expect(page.locator("#ft-file-status")).to_have_class(re.compile("error"))
    expect(page.locator("#ft-file-select option")).to_have_text(
        ["no training files yet: upload one above"]
    )


def test_fine_tune_a_lora_then_try_it_in_the_playground(page, server: Server, work: dict) -> None:
    """Upload, train 3 steps for real (checkpoint each), the loss curve drawn from the metrics
    events, the evaluation base vs adapter filled in, then the playground with the new model."""
    open_tab(page, "finetune")
    expect(page.locator("#ft-r")).to_have_value("8")  # the paper's LoRA
    expect(page.locator("#ft-alpha")).to_have_value("16")
    expect(page.locator("#ft-dropout")).to_have_value("0.05")
    text = upload_training_file(page, training_file(work["root"], "good.jsonl", good_records()))
    assert re.search(r"Uploaded good\.jsonl: 8 records \(instruction\), file-[0-9a-f]{24}\.", text)
    file_id = text.rsplit(" ", 1)[1].rstrip(".")
    expect(page.locator("#ft-file-select")).to_have_value(file_id)
    fill_job_form(page, **{"max-steps": "3", "checkpoint-every": "1", "suffix": "ui", "r": "4"})
    page.locator('#ft-datasets input[value="boolq"]').check()
    page.fill("#ft-eval-limit", "2")
    job_id = start_job(page)
    expect(page.locator(f'#ft-jobs tr[data-job="{job_id}"]')).to_be_visible()
    expect(page.locator("#ft-detail")).to_have_attribute("data-status", "succeeded")
    chart = page.locator("#ft-chart")
    expect(chart).to_have_attribute("data-points", "3")
    expect(chart.locator("svg polyline.train")).to_have_count(1)
    assert len(chart.locator("svg polyline.train").get_attribute("points").split()) == 3
    expect(page.locator('#ft-latest dd[data-field="step"]')).to_have_text("3 / 3")
    expect(page.locator('#ft-latest dd[data-field="train loss"]')).to_have_text(
        re.compile(r"^\d+\.\d{4}$")
    )
    expect(page.locator("#ft-cancel")).to_be_hidden()
    job = httpx.get(f"{server.base_url}/v1/fine_tuning/jobs/{job_id}").json()
    assert job["adapter"]["kind"] == "lora" and job["adapter"]["r"] == 4
    assert job["adapter"]["alpha"] == 16 and job["adapter"]["dropout"] == 0.05
    assert job["training"]["max_steps"] == 3 and job["hyperparameters"]["batch_size"] == 2
    model = job["fine_tuned_model"]
    assert model and model.startswith("ft:tiny:ui:")
    events = httpx.get(f"{server.base_url}/v1/fine_tuning/jobs/{job_id}/events?limit=100").json()
    losses = [e["data"]["train_loss"] for e in events["data"] if e["type"] == "metrics"]
    expect(page.locator('#ft-latest dd[data-field="train loss"]')).to_have_text(f"{losses[0]:.4f}")
    expect(page.locator("#ft-checkpoints")).to_contain_text("at steps 1, 2")
    # the evaluation job, base vs the adapter, filled in as it runs
    expect(page.locator("#ft-eval")).to_have_attribute("data-status", "succeeded")
    evaluation = httpx.get(f"{server.base_url}/v1/evaluations/{job['evaluation_job_id']}").json()
    assert evaluation["models"] == ["base", model]
    header = page.locator("#ft-eval-table thead th").all_text_contents()
    assert header == ["model", "boolq", "Average"]
    rows = [
        row.locator("th, td").all_text_contents()
        for row in page.locator("#ft-eval-table tbody tr").all()
    ]
    expected = expected_table(evaluation)
    assert [row[1:] for row in rows] == [row[1:] for row in expected]
    assert rows[0][0] == f"base ({BASE})" and rows[1][0] == model
    screenshot(page, "finetune")
    page.click("#ft-try")
    expect(page.locator("#tab-playground")).to_be_visible()
    expect(page.locator(f'#play-models input[value="{model}"]')).to_be_checked()
    expect(page.locator("#play-models input:checked")).to_have_count(1)
    page.fill("#play-max-tokens", "8")
    page.click("#play-send")
    expect(page.locator(".column.done")).to_have_count(1)
    output = page.locator(f'.column[data-model="{model}"] pre.output').text_content()
    assert output == api_completion(server, model, max_tokens=8)


def test_cancel_a_fine_tuning_job(page, server: Server, work: dict) -> None:
    open_tab(page, "finetune")
    path = training_file(work["root"], "long.jsonl", good_records(16))
    assert "Uploaded long.jsonl" in upload_training_file(page, path)
    fill_job_form(page, **{"epochs": "50", "max-steps": "100000", "checkpoint-every": "0"})
    job_id = start_job(page)
    expect(page.locator("#ft-detail")).to_have_attribute("data-status", "running")
    expect(page.locator("#ft-chart")).not_to_have_attribute("data-points", "0")  # it trains
    expect(page.locator("#ft-cancel")).to_be_visible()
    dialogs: list[str] = []
    page.once("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.accept()))
    page.click("#ft-cancel")
    expect(page.locator("#ft-detail")).to_have_attribute("data-status", "cancelled")
    expect(page.locator("#ft-title")).to_have_text(f"{job_id} · cancelled")
    expect(page.locator(f'#ft-jobs tr[data-job="{job_id}"] .job-status')).to_have_text("cancelled")
    expect(page.locator("#ft-cancel")).to_be_hidden()
    expect(page.locator("#ft-try")).to_be_hidden()
    assert dialogs and job_id in dialogs[0]
    job = httpx.get(f"{server.base_url}/v1/fine_tuning/jobs/{job_id}").json()
    assert job["status"] == "cancelled" and job["progress"]["step"] < 100000


def test_a_refused_job_shows_the_servers_message(page, server: Server, work: dict) -> None:
    """A LoRA rank above --max-adapter-rank (64 by default): the 400 names adapter.r, shown
    beside the form with the field marked; no job is made."""
    before = httpx.get(f"{server.base_url}/v1/fine_tuning/jobs").json()["data"]
    open_tab(page, "finetune")
    text = upload_training_file(page, training_file(work["root"], f"{XSS}.jsonl", good_records(2)))
    stored = httpx.get(f"{server.base_url}/v1/files").json()["data"][0]  # the newest
    assert text == f"Uploaded {stored['filename']}: 2 records (instruction), {stored['id']}."
    expect(page.locator("#ft-file-select option:checked")).to_contain_text(stored["filename"])
    assert_no_injection(page)  # the file's name (markup) is shown as text
    fill_job_form(page, r="65")
    page.click("#ft-start")
    status = page.locator("#ft-form-status")
    expect(status).to_have_text("adapter.r: 65 is above this server's --max-adapter-rank 64")
    expect(status).to_have_class(re.compile("error"))
    expect(page.locator("#ft-r")).to_have_attribute("aria-invalid", "true")
    assert httpx.get(f"{server.base_url}/v1/fine_tuning/jobs").json()["data"] == before
    page.fill("#ft-suffix", "bad suffix!")  # refused by the request's schema: also shown
    page.fill("#ft-r", "8")
    page.click("#ft-start")
    expect(status).to_contain_text("suffix")
    expect(page.locator("#ft-suffix")).to_have_attribute("aria-invalid", "true")
    expect(page.locator("#ft-r")).not_to_have_attribute("aria-invalid", "true")


# ---------------------------------------------------------------- metrics, layout


def test_live_metrics(page, server: Server) -> None:
    """While streams on three models run, the tiles show tokens per second and adapters per
    step; the adapters table shows requests served (from /metrics)."""
    open_tab(page, "metrics")
    expect(page.locator('[data-metric="kv"] .value')).to_contain_text(" / ")
    expect(page.locator("#metric-tiers")).to_contain_text("device")
    stop = threading.Event()

    def keep_busy(model: str) -> None:  # streams until the checks are done
        while not stop.is_set():
            api_completion(server, model, max_tokens=200, ignore_eos=True)

    with ThreadPoolExecutor(6) as pool:
        load = [pool.submit(keep_busy, model) for model in [BASE, "lora-a", "lora-b"] * 2]
        try:
            for metric in ("step-tps", "step-adapters", "running"):
                expect(page.locator(f'[data-metric="{metric}"] .value')).not_to_have_text(
                    re.compile(r"^0(\.0+)?$")
                )
            page.wait_for_timeout(4500)  # more points on each sparkline, still under load
            screenshot(page, "metrics")
        finally:
            stop.set()
        for future in load:
            future.result()
    expect(page.locator("[data-metric] svg polyline")).to_have_count(10)
    open_tab(page, "adapters")
    served = page.locator('#adapters-table tr[data-name="lora-a"] td.num').nth(3)
    expect(served).not_to_have_text("-")


def test_prometheus_text_parser(page) -> None:
    open_tab(page, "metrics")
    text = (
        "# HELP x_total a counter\n# TYPE x_total counter\n"
        'x_total{model="a",outcome="ok"} 3.0\nx_total{model="a",outcome="error"} 1\n'
        'x_total{model="q\\"\\\\n",outcome="ok"} 2e3\ny 7\n'
    )
    result = page.evaluate(
        """async (text) => {
            const prom = await import('/ui/js/prom.js');
            const samples = prom.parse(text);
            return [samples.length, prom.total(samples, 'x_total', { model: 'a' }),
                    prom.byLabel(samples, 'x_total', 'model'), prom.total(samples, 'y')];
        }""",
        text,
    )
    assert result == [4, 4, {"a": 4, 'q"\\n': 2000}, 7]


def test_a_narrow_window_has_no_sideways_scroll(page) -> None:
    page.set_viewport_size({"width": 400, "height": 860})
    for tab in ("adapters", "playground", "evaluations", "finetune", "metrics"):
        open_tab(page, tab)
        width = page.evaluate("document.documentElement.scrollWidth")
        assert width <= 400, (tab, width)
    open_tab(page, "adapters")
    screenshot(page, "narrow")


# ---------------------------------------------------------------- API keys


@pytest.fixture(scope="module")
def keyed_server(tiny_model_dir: Path, work: dict[str, Path]) -> Iterator[Server]:
    srv = start_server(
        tiny_model_dir,
        work["root"] / "keyed.log",
        "--served-model-name",
        BASE,
        "--api-key",
        USER_KEY,
        "--admin-api-key",
        ADMIN_KEY,
    )
    yield srv
    stop_server(srv)


def test_with_an_api_key_the_page_asks_for_it(browser, keyed_server: Server, work: dict) -> None:
    context = browser.new_context(
        viewport={"width": 1280, "height": 700}, base_url=keyed_server.base_url
    )
    context.set_default_timeout(TIMEOUT_MS)
    page = context.new_page()
    page.goto("/ui/")
    expect(page.locator("#key-panel")).to_be_visible()
    expect(page.locator("#server-status")).to_have_text("API key needed")
    screenshot(page, "key")
    page.fill("#key-input", "wrong")
    page.click("#key-form button[type=submit]")
    expect(page.locator("#key-error")).to_have_text("Invalid API key.")
    page.fill("#key-input", USER_KEY)
    page.click("#key-form button[type=submit]")
    expect(page.locator("#key-panel")).to_be_hidden()
    expect(page.locator("#base-card")).to_contain_text(BASE)
    assert page.evaluate("sessionStorage.getItem('adapterserve.apiKey')") == USER_KEY
    assert page.evaluate("localStorage.length") == 0
    # an upload needs the admin key: the server's refusal is shown, and the key asked for
    page.fill("#upload-name", "lora-a")
    page.set_input_files("#upload-files", adapter_files(work["lora-a"]))
    page.click("#upload-send")
    expect(page.locator("#upload-status")).to_contain_text("send the admin key")  # a 403
    expect(page.locator("#key-panel")).to_be_visible()
    page.fill("#key-input", ADMIN_KEY)
    page.click("#key-form button[type=submit]")
    expect(page.locator("#key-panel")).to_be_hidden()
    page.click("#upload-send")
    expect(page.locator("#upload-status")).to_contain_text("Uploaded lora-a")
    page.reload()  # the same tab keeps its key
    expect(page.locator('#adapters-table tr[data-name="lora-a"]')).to_be_visible()
    context.close()
    other = browser.new_context(base_url=keyed_server.base_url)  # another tab: asked again
    fresh = other.new_page()
    fresh.goto("/ui/")
    expect(fresh.locator("#key-panel")).to_be_visible()
    other.close()
