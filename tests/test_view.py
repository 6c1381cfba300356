"""view.py's page in a real browser (Debian's headless Chromium, driven by Selenium): written from a real tiny run and
from eval.py --imagine, it lists the records, opens episodes, groups and comparisons, and shows a token's exact values
on hover, with no error in the browser's console. Without the browser the test fails: CI installs it (.ci/run)."""

import gzip
import json

import pytest
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.support.select import Select
from selenium.webdriver.support.ui import WebDriverWait

import eval as evaluation
import train_paw
import view

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
EVAL = ["--model_name_or_path", "tiny", "--games", "generated", "--num_games", "3", "--max_env_steps", "3",
        "--max_action_tokens", "8", "--max_observation_tokens", "16", "--env_workers", "0", "--episode_details"]


@pytest.fixture(scope="module")
def browser():
    try:
        driver = view.headless_chromium()
    except Exception as error:  # never a skip: CI must have the browser
        pytest.fail(f"the browser test needs headless Chromium and Selenium: {error}")
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def pages(tmp_path_factory):
    """A real 2-step tiny run with every step recorded, and two evaluations of its games (the tiny model, and the run's
    adapter on it) with --imagine; the pages view.py writes of them."""
    root = tmp_path_factory.mktemp("view")
    run = root / "run"
    train_paw.main(["--model_name_or_path", "tiny", "--games", "generated", "--max_steps", "2", "--max_env_steps", "3",
                    "--max_action_tokens", "12", "--env_workers", "0", "--episode_log_steps", "1",
                    "--output_dir", str(run)])
    evaluation.main(EVAL + ["--imagine", "--output", str(root / "base")])
    evaluation.main(EVAL + ["--adapter", str(run), "--output", str(root / "trained")])
    return {"run": view.main([str(run)]), "eval": view.main([str(root / "base.jsonl")]),
            "compare": view.main([str(root / "base.jsonl"), str(root / "trained.jsonl"), "--compare",
                                  "--output", str(root / "compare.html")]),
            "records": {"run": [json.loads(line) for step in sorted((run / "episodes").iterdir())
                                for line in gzip.open(step, "rt")],
                        "eval": [json.loads(line) for line in (root / "base.jsonl").read_text().splitlines()]}}


def open_page(browser, path):
    browser.get(path.resolve().as_uri())
    WebDriverWait(browser, 10).until(lambda d: d.find_element(By.ID, "count").get_attribute("textContent"))


def rows(browser):
    return browser.find_elements(By.CSS_SELECTOR, "#rows tr.ep")


def hover(browser, element):
    ActionChains(browser).move_to_element(element).perform()
    tip = browser.find_element(By.ID, "tip")
    WebDriverWait(browser, 5).until(lambda d: tip.is_displayed())
    return {e.get_attribute("data-k"): e.text for e in tip.find_elements(By.CSS_SELECTOR, "[data-k]")}


def assert_no_console_errors(browser):
    errors = [entry for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]
    assert not errors, errors


def test_a_training_runs_page_lists_filters_and_opens_its_episodes_with_exact_token_values(browser, pages, tmp_path):
    records = pages["records"]["run"]
    assert {r["step"] for r in records} == {1, 2}
    open_page(browser, pages["run"])
    assert len(browser.find_elements(By.CSS_SELECTOR, "#overview tr.ep")) == 2  # one row per logged step
    browser.find_element(By.CSS_SELECTOR, "nav button[data-view=episodes]").click()
    assert len(rows(browser)) == len(records)
    Select(browser.find_element(By.ID, "f-step")).select_by_value("2")  # a filter changes what is listed
    assert len(rows(browser)) == sum(r["step"] == 2 for r in records) < len(records)
    Select(browser.find_element(By.ID, "f-step")).select_by_value("")

    rows(browser)[1].click()  # the second episode of step 1, turn by turn
    record = records[1]
    WebDriverWait(browser, 10).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#episode .turn"))
    assert len(browser.find_elements(By.CSS_SELECTOR, "#episode .turn")) == len(record["turns"])
    turn = browser.find_elements(By.CSS_SELECTOR, "#episode .turn")[0]
    reply = turn.find_elements(By.CSS_SELECTOR, ".tok[data-kind=reply]")
    assert [t.get_attribute("textContent") for t in reply] == record["turns"][0]["reply_tokens"]
    shown = hover(browser, reply[2])
    assert float(shown["logp"]) == record["turns"][0]["reply_logp"][2]
    assert float(shown["entropy"]) == record["turns"][0]["reply_entropy"][2]
    assert float(shown["advantage"]) == record["turns"][0]["advantage"]
    observation = turn.find_elements(By.CSS_SELECTOR, ".tok[data-kind=obs]")
    shown = hover(browser, observation[0])
    assert float(shown["logp"]) == record["turns"][0]["obs_logp"][0]
    assert shown["clipped"].startswith("yes" if record["turns"][0]["obs_clipped"][0] else "no")
    selected = browser.find_elements(By.CSS_SELECTOR, "#episode .turn.selected")
    assert len(selected) == sum(t["selected"] for t in record["turns"])
    browser.save_screenshot(str(tmp_path / "episode.png"))
    assert (tmp_path / "episode.png").read_bytes()[:8] == PNG_MAGIC

    browser.find_element(By.CSS_SELECTOR, "#episode .back").click()
    browser.find_element(By.CSS_SELECTOR, "#rows a[data-group]").click()  # group 0 of step 1, side by side
    WebDriverWait(browser, 10).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#group .cols > div"))
    group = [r for r in records if r["step"] == 1 and r["group"] == 0]
    assert len(browser.find_elements(By.CSS_SELECTOR, "#group .cols > div")) == len(group)
    assert_no_console_errors(browser)


def test_an_evaluations_page_shows_the_imagined_observations_and_a_comparison_the_same_games(browser, pages):
    records = pages["records"]["eval"]
    open_page(browser, pages["eval"])
    browser.find_element(By.CSS_SELECTOR, "nav button[data-view=episodes]").click()
    assert len(rows(browser)) == len(records)
    rows(browser)[0].click()
    WebDriverWait(browser, 10).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#episode .imagined"))
    imagined = browser.find_elements(By.CSS_SELECTOR, "#episode .imagined")
    assert [e.get_attribute("textContent") for e in imagined] == [t["imagined"] for t in records[0]["turns"]
                                                                    if "imagined" in t]
    assert_no_console_errors(browser)

    open_page(browser, pages["compare"])  # opens on the comparison: the 3 games both evaluations played
    games = browser.find_elements(By.CSS_SELECTOR, "#c-games tr.ep")
    assert len(games) == len(records)
    games[0].click()
    WebDriverWait(browser, 10).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#c-right .turn"))
    assert len(browser.find_elements(By.CSS_SELECTOR, "#c-left .turn")) == len(records[0]["turns"])
    assert_no_console_errors(browser)
