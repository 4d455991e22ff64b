"""mkdocs hook: the reference pages, generated from the code at build time (siimcovid.reference.pages)."""

from mkdocs.structure.files import File
from siimcovid.reference import pages


def on_files(files, config):
    for path, text in pages().items():
        files.append(File.generated(config, path, content=text))
    return files
