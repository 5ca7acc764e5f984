"""Gather the large corpus's English prose into one folder of .txt.xz files (for large_corpus_run.sh).

    python benchmarks/gather_prose.py --out .gpu_text [--shared ../shared]

The GPU machine cannot reach the internet and takes at most 64 MiB per call, so the prose is
gathered here, compressed (about 32 MB), and carried. Sources, all real English written by people:
- the texts of ../shared/data/text (King James Bible, Moby-Dick, Shakespeare and Milton, State of
  the Union addresses, Perl's and Python's documentation);
- Debian documentation packages fetched with `apt-get download` (this machine reaches Debian's
  mirror): the Linux kernel's documentation (reST), PostgreSQL's, Django's, git's, Sphinx's, R's,
  GIMP's and LibreOffice's help, the Debian handbook and reference, GNOME's user guide, and three
  dictionaries (GCIDE, i.e. Webster's 1913, FOLDOC and the Jargon File);
- held-out prose (heldout_text/): ../shared/docs and the training guide, in no corpus;
- long held-out prose (heldout_long/, plain text, one document a file): Debian's Policy Manual (its
  reST sources in order) and Developer's Reference, each far beyond 32K tokens and in no corpus,
  for loss by position (benchmarks/bench_quality.py --heldout_text).
HTML and Mallard pages are reduced to their text; each page is a document (blank lines apart);
pages shorter than 200 characters and exact repeats are left out. Every package is MIT/GPL/GFDL or
public-domain documentation; their copyright files are in the packages.
"""
from __future__ import annotations

import argparse
import gzip
import html.parser
import lzma
import re
import shutil
import subprocess
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path


class _TextOnly(html.parser.HTMLParser):
    """The visible text of an HTML/XML page, one block element per paragraph."""
    SKIP = {"script", "style", "head", "nav", "title"}
    BLOCK = {"p", "div", "br", "li", "h1", "h2", "h3", "h4", "h5", "h6", "pre", "tr", "section", "dt",
             "dd", "table", "desc"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.parts, self.skipping = [], 0

    def handle_starttag(self, tag, attrs):
        self.skipping += tag in self.SKIP
        if tag in self.BLOCK:
            self.parts.append("\n")

    def handle_endtag(self, tag):
        if tag in self.SKIP and self.skipping:
            self.skipping -= 1
        if tag in self.BLOCK:
            self.parts.append("\n")

    def handle_data(self, data):
        if not self.skipping:
            self.parts.append(data)


def markup_to_text(page: str) -> str:
    parser = _TextOnly()
    parser.feed(page)
    text = re.sub(r"[ \t\r\f\v]+", " ", "".join(parser.parts))
    text = re.sub(r"\n\s*\n\s*(\n\s*)+", "\n\n", text)
    return "\n".join(line.strip() for line in text.splitlines()).strip()


def _read(path: Path) -> str:
    if path.suffix in (".gz", ".dz"):
        return gzip.open(path, "rt", encoding="utf-8", errors="replace").read()
    return path.read_text(encoding="utf-8", errors="replace")


# output name: (Debian package, file glob, a path filter, reduce markup to text?)
PACKAGES = {
    "linux_docs": ("linux-doc-6.1", "*.rst.gz", "/Documentation/", False),
    "postgresql_doc": ("postgresql-doc-15", "*.html", "", True),
    "django_doc": ("python-django-doc", "*.html", "", True),
    "git_doc": ("git-doc", "*.txt", "", False),
    "sphinx_doc": ("sphinx-doc", "*.txt", "", False),
    "r_doc": ("r-doc-html", "*.html", "", True),
    "gimp_help": ("gimp-help-en", "*.html", "", True),
    "libreoffice_help": ("libreoffice-help-en-us", "*.html", "", True),
    "debian_handbook": ("debian-handbook", "*.html", "/en-US/", True),
    "debian_reference": ("debian-reference-en", "*.html", "", True),
    "gnome_user_docs": ("gnome-user-docs", "*.page", "/C/", True),
    "gcide": ("dict-gcide", "*.dict.dz", "", False),
    "foldoc": ("dict-foldoc", "*.dict.dz", "", False),
    "jargon": ("dict-jargon", "*.dict.dz", "", False),
}


# Long single documents, kept out of the corpus: name -> (Debian package, file glob, markup?)
HELDOUT_LONG = {
    "debian_policy": ("debian-policy", "policy.html/_sources/*.rst.txt", False),
    "developers_reference": ("developers-reference", "developers-reference.html", True),
}


def write_documents(out: Path, documents) -> int:
    """Documents into out (xz), blank lines apart; short ones and exact repeats left out."""
    seen, chars = set(), 0
    with lzma.open(out, "wt", encoding="utf-8", preset=9) as f:
        for doc in documents:
            if len(doc) < 200 or doc in seen:
                continue
            seen.add(doc)
            f.write(doc + "\n\n\n")
            chars += len(doc)
    return chars


def gather_package(name: str, out_dir: Path, work: Path) -> tuple[str, int]:
    package, pattern, must_contain, is_markup = PACKAGES[name]
    folder = work / package
    folder.mkdir(parents=True, exist_ok=True)
    subprocess.run(["apt-get", "download", package], cwd=folder, check=True, capture_output=True)
    deb = next(folder.glob("*.deb"))
    subprocess.run(["dpkg-deb", "-x", str(deb), str(folder / "root")], check=True)
    files = sorted(p for p in (folder / "root").rglob(pattern) if p.is_file() and must_contain in str(p))
    docs = (markup_to_text(_read(p)) if is_markup else _read(p) for p in files)
    return name, write_documents(out_dir / f"{name}.txt.xz", docs)


def gather_long(name: str, out_dir: Path, work: Path) -> tuple[str, int]:
    package, pattern, is_markup = HELDOUT_LONG[name]
    folder = work / package
    folder.mkdir(parents=True, exist_ok=True)
    subprocess.run(["apt-get", "download", package], cwd=folder, check=True, capture_output=True)
    subprocess.run(["dpkg-deb", "-x", str(next(folder.glob("*.deb"))), str(folder / "root")], check=True)
    parts = [markup_to_text(_read(p)) if is_markup else _read(p) for p in sorted((folder / "root").rglob(pattern))]
    text = "\n\n".join(parts)
    (out_dir / f"{name}.txt").write_text(text, encoding="utf-8")
    return name, len(text)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--shared", type=Path, default=Path(__file__).resolve().parents[2] / "shared")
    ap.add_argument("--workers", type=int, default=4)
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    for text in sorted((args.shared / "data" / "text").glob("*.txt")):
        with lzma.open(args.out / f"{text.name}.xz", "wb", preset=9) as f:
            f.write(text.read_bytes())
        print(f"{text.name}: {text.stat().st_size:,} bytes")
    heldout = args.out / "heldout_text"
    heldout.mkdir(exist_ok=True)
    for doc in [*(args.shared / "docs").glob("*.md"), args.shared / "seed" / "TRAINING_GUIDE_100M.en.md"]:
        shutil.copyfile(doc, heldout / doc.name)
    with tempfile.TemporaryDirectory() as work, ProcessPoolExecutor(args.workers) as pool:
        for name, chars in pool.map(gather_package, PACKAGES, [args.out] * len(PACKAGES),
                                    [Path(work)] * len(PACKAGES)):
            print(f"{name}: {chars:,} characters")
    long = args.out / "heldout_long"
    long.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory() as work:
        for name in HELDOUT_LONG:
            print("%s (held out): %s characters" % (name, f"{gather_long(name, long, Path(work))[1]:,}"))
    total = sum(p.stat().st_size for p in args.out.rglob("*") if p.is_file())
    print(f"{args.out}: {total / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
