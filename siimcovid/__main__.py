from siimcovid.cli import entrypoint

entrypoint()
