"""Property-based fuzzing of the hub's whole OpenAPI schema with schemathesis, against a
real hub process over real TLS, as an operator (the admin token).

Asserted for every operation, on generated valid and invalid requests: no 5xx; every status
a route answers is declared in the schema, and its body and content type are those the
schema declares (the answer models, the error body); a method a path does not take answers
405 with an ``Allow`` header naming exactly the methods it does take. Bounded in time
(``--max-time``) and seeded, so CI sees the same run each time; set OUTPOST_FUZZ_SECONDS to
hunt longer.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from tests.support import Hub, clean_env

CHECKS = ("not_a_server_error", "status_code_conformance", "unsupported_method",
          "allow_header_conformance", "response_schema_conformance",
          "content_type_conformance")


def _st() -> str:
    found = shutil.which("st", path=str(Path(sys.executable).parent))
    assert found, "schemathesis is not installed: pip install -e '.[dev]'"
    return found


def test_fuzz_the_whole_api(sqlite_hub: Hub, tmp_path: Path) -> None:
    hub = sqlite_hub
    seconds = os.environ.get("OUTPOST_FUZZ_SECONDS", "45")
    report = tmp_path / "fuzz.json"
    done = subprocess.run(
        [_st(), "run", f"{hub.url}/openapi.json", "--tls-verify", str(hub.data_dir / "ca.pem"),
         "-H", f"Authorization: Bearer {hub.admin_token}", "--checks", ",".join(CHECKS),
         "--phases", "examples,coverage,fuzzing", "--max-examples", "25", "--seed", "20261205",
         "--workers", "2", "--max-time", seconds, "--request-timeout", "30",
         "--report", "json", "--report-json-path", str(report), "--no-color"],
        capture_output=True, text=True, timeout=int(seconds) + 120,
        env=clean_env(SCHEMATHESIS_HOOKS=""), cwd=tmp_path)
    summary = done.stdout[done.stdout.find("SUMMARY"):] if "SUMMARY" in done.stdout else ""
    print(summary)
    assert report.exists(), done.stdout[-4000:] + done.stderr[-4000:]
    result = json.loads(report.read_text())
    assert result["failures"] == [], done.stdout[-12000:]
    # A known fault of the fuzzer itself, not of the hub: on Python 3.11 describing one of
    # its own filter lambdas may fail inside the ast module ("AST constructor recursion
    # depth mismatch"); it ends that operation's phase, not the run.
    # The report names such an error only by its title ("Runtime Error"); the text that
    # tells it apart is in the run's output, once per error.
    known = done.stdout.count("AST constructor recursion depth mismatch")
    errors = [e for e in result["errors"] if "recursion depth mismatch" not in json.dumps(e)]
    fuzzer_faults = sum(int(e.get("count", 1)) for e in errors
                        if e.get("title") == "Runtime Error")
    if 0 < fuzzer_faults <= known:
        errors = [e for e in errors if e.get("title") != "Runtime Error"]
    assert errors == [], done.stdout[-12000:]
    assert result["test_cases"]["generated"] >= 1000, result["test_cases"]
    assert result["operations"]["tested"] == result["operations"]["total"], result["operations"]
    log = hub.log()
    assert "Traceback" not in log, log[-6000:]
