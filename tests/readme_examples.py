"""The README's fenced blocks as examples to run (tests/test_readme.py runs them).

A block is run by its language: `sh`/`bash`/`shell` in bash, one session for the whole README
(each block sees what the blocks before it exported; `set -euo pipefail`; curl fails on an
HTTP error through a `.curlrc`), `graphql` posted to /graphql (every operation of the
document in order), `python` and `js` as scripts, and `json` compared in shape with the answer
of the block just before it. `text` blocks are figures, never run. Any other language, or a
block that cannot run against a test server, carries a directive right before its fence:

    <!-- readme-test: skip (why) -->

Other directives, also right before the fence (several lines of them may follow each other):

    <!-- readme-test: variables {"id": "$JOHN"} -->          GraphQL variables; "$NAME" is a
                                                            value captured earlier (or exported
                                                            by a shell block)
    <!-- readme-test: capture JOHN=data.consumerCreate.consumer.id CURSOR=/re(gex)/ -->
                                                            values of the answer (a dotted path
                                                            into a GraphQL answer, or a regular
                                                            expression's first group in any
                                                            output) kept as NAME, and exported
                                                            to the shell blocks after it
    <!-- readme-test: replace key_01J…=$CI_KEY_ID -->       placeholder text replaced before
                                                            the block runs
    <!-- readme-test: expect errors -->                     an example about errors: GraphQL
                                                            errors or userErrors are expected,
                                                            curl does not fail on 4xx/5xx

Every `127.0.0.1:8000` (the README's address) is replaced with the test server's.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from graphql import OperationDefinitionNode, parse

from tests.log_audit import AUDIT

README = Path(__file__).parent.parent / "README.md"
README_ADDRESS = "127.0.0.1:8000"

SHELL = frozenset({"sh", "bash", "shell"})
RUN = SHELL | {"graphql", "python", "js", "json"}
FIGURES = frozenset({"text"})  # diagrams and listings: not examples
DIRECTIVE = re.compile(r"^ {0,3}<!--\s*readme-test:\s*(.*?)\s*-->\s*$")
FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})\s*([^`\s]*)(.*)$")


class ExampleFailed(AssertionError):
    pass


@dataclass
class Block:
    line: int  # 1-based line of the opening fence
    lang: str
    body: str
    skip: str | None = None
    variables: dict[str, Any] | None = None
    captures: dict[str, str] = field(default_factory=dict)
    replace: dict[str, str] = field(default_factory=dict)
    expect_errors: bool = False

    def where(self) -> str:
        return f"README.md:{self.line} ({self.lang or 'no language'})"


def parse_blocks(text: str) -> tuple[list[Block], list[str]]:
    """The fenced blocks with their directives, and every problem found on the way (a block
    of no runnable kind without `skip`, a malformed or stray directive)."""
    blocks: list[Block] = []
    problems: list[str] = []
    pending: list[tuple[int, str]] = []
    lines = text.splitlines()
    index = 0
    while index < len(lines):
        line = lines[index]
        directive = DIRECTIVE.match(line)
        opening = FENCE.match(line)
        if directive:
            pending.append((index + 1, directive.group(1)))
        elif opening:
            fence, lang = opening.group(1), opening.group(2).lower()
            body: list[str] = []
            index += 1
            while index < len(lines) and not lines[index].strip().startswith(fence):
                body.append(lines[index])
                index += 1
            block = Block(line=len(lines[:index]) - len(body), lang=lang,
                          body="\n".join(body) + "\n")
            for number, words in pending:
                problem = _apply(block, words)
                if problem:
                    problems.append(f"README.md:{number}: {problem}")
            pending = []
            if block.skip is None and block.lang not in RUN | FIGURES:
                problems.append(
                    f"{block.where()}: a block that no test runs; give it a runnable language "
                    f"({', '.join(sorted(RUN))}), `text` for a figure, or put "
                    "`<!-- readme-test: skip (why) -->` right before it")
            blocks.append(block)
        elif pending:
            stray = ", ".join(f"README.md:{number}" for number, _ in pending)
            problems.append(f"{stray}: a readme-test directive must come right before a fence")
            pending = []
        index += 1
    if pending:
        problems.append(f"README.md:{pending[0][0]}: a readme-test directive with no block")
    for previous, block in itertools.pairwise(blocks):
        if block.lang == "json" and block.skip is None and (
                previous.skip is not None or previous.lang not in RUN - {"json"}):
            problems.append(f"{block.where()}: a JSON answer must follow the example it answers")
    if blocks and blocks[0].lang == "json" and blocks[0].skip is None:
        problems.append(f"{blocks[0].where()}: a JSON answer must follow its example")
    return blocks, problems


def _apply(block: Block, words: str) -> str | None:
    verb, _, rest = words.partition(" ")
    rest = rest.strip()
    if verb == "skip":
        reason = re.fullmatch(r"\((.+)\)", rest)
        if reason is None:
            return "skip needs a reason in parentheses: <!-- readme-test: skip (why) -->"
        block.skip = reason.group(1)
    elif verb == "variables":
        try:
            variables = json.loads(rest)
        except ValueError as error:
            return f"variables are not JSON: {error}"
        if not isinstance(variables, dict):
            return "variables must be a JSON object"
        block.variables = variables
    elif verb in ("capture", "replace"):
        pairs = rest.split()
        if not pairs or not all("=" in pair for pair in pairs):
            return f"{verb} takes NAME=VALUE pairs"
        target = block.captures if verb == "capture" else block.replace
        for pair in pairs:
            name, _, value = pair.partition("=")
            target[name] = value
    elif words == "expect errors":
        block.expect_errors = True
    else:
        return f"unknown readme-test directive {words!r}"
    return None


class Session:
    """Runs blocks in order against a server at ``url``, in ``workdir`` (where `.venv/bin` is
    the running interpreter's), the shell's environment carried from block to block."""

    def __init__(self, url: str, workdir: Path, env: dict[str, str]) -> None:
        self.url = url
        self.workdir = workdir
        self.env = dict(env)
        self.skipped: list[Block] = []
        self.not_run: list[str] = []
        venv = workdir / ".venv"
        venv.mkdir(exist_ok=True)
        if not (venv / "bin").exists():
            (venv / "bin").symlink_to(Path(sys.executable).parent, target_is_directory=True)
        self._curl_fail = workdir / "curl-fail"
        self._curl_fail.mkdir(exist_ok=True)
        # An HTTP error fails the command (with its body shown), as `set -e` then stops the block.
        (self._curl_fail / ".curlrc").write_text("--fail-with-body\n--silent\n--show-error\n")
        self._curl_plain = workdir / "curl-plain"
        self._curl_plain.mkdir(exist_ok=True)
        (self._curl_plain / ".curlrc").write_text("--silent\n--show-error\n")
        self._last_answer: Any = None
        self._last_block: Block | None = None

    def run_all(self, blocks: list[Block]) -> None:
        for block in blocks:
            self.run(block)

    def run(self, block: Block) -> None:
        if block.skip is not None:
            self.skipped.append(block)
            return
        if block.lang in FIGURES:
            return
        for name in block.captures:  # captured again by this block, or the block fails
            self.env.pop(name, None)
        source = block.body.replace(README_ADDRESS, self.url.removeprefix("http://"))
        for placeholder, value in block.replace.items():
            if placeholder not in source:
                raise ExampleFailed(f"{block.where()}: {placeholder!r} is not in the block")
            source = source.replace(placeholder, self._value(block, value))
        if block.lang in SHELL:
            answer = self._shell(block, source)
        elif block.lang == "graphql":
            answer = self._graphql(block, source)
        elif block.lang == "python":
            answer = self._script(block, [sys.executable], source, ".py")
        elif block.lang == "js":
            node = shutil.which("node")
            if node is None:
                self.not_run.append(f"{block.where()}: Node.js (`node`) is not installed")
                return
            answer = self._script(block, [node], source, ".mjs")
        else:  # json
            self._compare(block, source)
            return
        self._capture(block, answer)
        self._last_answer, self._last_block = answer, block

    def _value(self, block: Block, reference: str) -> str:
        name = reference.removeprefix("$")
        if name not in self.env:
            raise ExampleFailed(f"{block.where()}: ${name} was never captured or exported")
        return self.env[name]

    def _shell(self, block: Block, source: str) -> str:
        env_out = self.workdir / "env.out"
        script = self.workdir / f"block-{block.line}.sh"
        script.write_text(f"set -euo pipefail\n{source}\nenv -0 > {env_out}\n")
        env = {**self.env, "CURL_HOME": str(
            self._curl_plain if block.expect_errors else self._curl_fail)}
        done = subprocess.run(["bash", str(script)], cwd=self.workdir, env=env,
                              capture_output=True, text=True, timeout=600, check=False)
        if done.returncode != 0:
            raise ExampleFailed(f"{block.where()} exited {done.returncode}:\n{source}\n"
                                f"stdout:\n{done.stdout[-3000:]}\nstderr:\n{done.stderr[-3000:]}")
        if not block.expect_errors and '"errors"' in done.stdout:
            raise ExampleFailed(f"{block.where()} printed GraphQL errors:\n{done.stdout[-3000:]}")
        exported = env_out.read_text().split("\0")
        self.env = dict(item.split("=", 1) for item in exported if "=" in item)
        self.env.pop("CURL_HOME", None)
        return done.stdout

    def _script(self, block: Block, command: list[str], source: str, suffix: str) -> str:
        script = self.workdir / f"block-{block.line}{suffix}"
        script.write_text(source)
        done = subprocess.run([*command, str(script)], cwd=self.workdir, env=self.env,
                              capture_output=True, text=True, timeout=120, check=False)
        if done.returncode != 0:
            raise ExampleFailed(f"{block.where()} exited {done.returncode}:\n"
                                f"stdout:\n{done.stdout[-3000:]}\nstderr:\n{done.stderr[-3000:]}")
        return done.stdout

    def _graphql(self, block: Block, source: str) -> Any:
        operations = [d for d in parse(source).definitions
                      if isinstance(d, OperationDefinitionNode)]
        if not operations:
            raise ExampleFailed(f"{block.where()}: no operation in the block")
        key = self.env.get("CONSUMERS_KEY")
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        body: Any = None
        for operation in operations:
            payload: dict[str, Any] = {"query": source}
            if operation.name is not None:
                payload["operationName"] = operation.name.value
            if block.variables is not None:
                payload["variables"] = self._expand(block.variables)
            with httpx.Client(timeout=60, event_hooks=AUDIT.sync_event_hooks()) as client:
                response = client.post(f"{self.url}/graphql", json=payload, headers=headers)
            body = response.json()
            name = operation.name.value if operation.name else "(anonymous)"
            if not block.expect_errors:
                if response.status_code != 200 or "errors" in body:
                    raise ExampleFailed(f"{block.where()} {name}: HTTP {response.status_code}"
                                        f"\n{json.dumps(body, indent=1)[:3000]}")
                refused = list(_user_errors(body.get("data")))
                if refused:
                    raise ExampleFailed(f"{block.where()} {name}: userErrors {refused}")
            self._capture(block, body, final=False)
        return body

    def _expand(self, value: Any) -> Any:
        """'$NAME' strings become the value captured under NAME (null while there is none:
        an operation of the same document may capture it first)."""
        if isinstance(value, str) and value.startswith("$"):
            return self.env.get(value[1:])
        if isinstance(value, list):
            return [self._expand(item) for item in value]
        if isinstance(value, dict):
            return {key: self._expand(item) for key, item in value.items()}
        return value

    def _capture(self, block: Block, answer: Any, *, final: bool = True) -> None:
        for name, spec in block.captures.items():
            value = _extract(answer, spec)
            if value is not None:
                self.env[name] = value
            elif final and name not in self.env:  # (a document's operations capture in turn)
                raise ExampleFailed(f"{block.where()}: nothing to capture as {name} with "
                                    f"{spec!r} in\n{str(answer)[:3000]}")

    def _compare(self, block: Block, source: str) -> None:
        assert self._last_block is not None
        expected = json.loads(source)
        actual = self._last_answer
        if isinstance(actual, str):
            try:
                actual = json.loads(actual)
            except ValueError as error:
                raise ExampleFailed(f"{block.where()}: the answer of "
                                    f"{self._last_block.where()} is not JSON: {actual[:500]!r}"
                                    ) from error
        mismatches = list(shape_mismatches(expected, actual, "$"))
        if mismatches:
            raise ExampleFailed(f"{block.where()}: the answer of {self._last_block.where()} "
                                f"has another shape: {mismatches}\n{json.dumps(actual)[:3000]}")


def _user_errors(data: Any) -> Iterator[Any]:
    if isinstance(data, dict):
        for key, value in data.items():
            if key == "userErrors" and value:
                yield value
            else:
                yield from _user_errors(value)
    elif isinstance(data, list):
        for item in data:
            yield from _user_errors(item)


def _extract(answer: Any, spec: str) -> str | None:
    if spec.startswith("/") and spec.endswith("/") and len(spec) > 1:
        text = answer if isinstance(answer, str) else json.dumps(answer)
        found = re.search(spec[1:-1], text)
        if found is None:
            return None
        return found.group(1) if found.groups() else found.group()
    value = answer
    for step in spec.split("."):
        if isinstance(value, list) and step.isdigit() and int(step) < len(value):
            value = value[int(step)]
        elif isinstance(value, dict) and step in value:
            value = value[step]
        else:
            return None
    return None if value is None else str(value)


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    return type(value).__name__


def shape_mismatches(expected: Any, actual: Any, path: str) -> Iterator[str]:
    """Same keys and the same JSON types, the README's sample values aside; each element of a
    list has the shape of the README's first one; "cons_…" is a string starting "cons_"."""
    if isinstance(expected, dict) and isinstance(actual, dict):
        if set(expected) != set(actual):
            yield f"{path}: keys {sorted(actual)}, the README shows {sorted(expected)}"
        for key in expected.keys() & actual.keys():
            yield from shape_mismatches(expected[key], actual[key], f"{path}.{key}")
    elif isinstance(expected, list) and isinstance(actual, list):
        if not expected and actual:
            yield f"{path}: {len(actual)} items, the README shows none"
        for index, item in enumerate(actual if expected else []):
            yield from shape_mismatches(expected[0], item, f"{path}[{index}]")
    elif _kind(expected) != _kind(actual):
        yield f"{path}: a {_kind(actual)}, the README shows a {_kind(expected)}"
    elif isinstance(expected, str) and "…" in expected:
        pattern = ".*".join(re.escape(part) for part in expected.split("…"))
        if re.fullmatch(pattern, actual, re.DOTALL) is None:
            yield f"{path}: {actual!r} is not like {expected!r}"


def clean_environment() -> dict[str, str]:
    """The test's environment without its CONSUMERS_* settings (the README's blocks get the
    server's own)."""
    return {k: v for k, v in os.environ.items() if not k.startswith("CONSUMERS_")}
