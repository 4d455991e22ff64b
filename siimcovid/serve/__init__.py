"""`siimcovid serve`: a DICOM node that predicts studies as they arrive, with a bundle (siimcovid.bundle) and
`siimcovid predict`, and sends the results back.

`__all__` names every module of the package; each line below names the module's public functions
(see siimcovid/__init__.py for the rule).

Modules:
    node.py     the stage: main(cfg), serve(cfg) the node (Storage SCP or DICOMweb poll, predict, send), status(cfg)
                `serve status`: every study and its sends
    queue.py    Queue: <out>/queue.sqlite, every study, instance and send and its state (a restart goes on from it)
    send.py     store_scu(...) C-STORE, stow(...) STOW-RS, studies_on(...) QIDO-RS, fetch_study(...) WADO-RS
"""

__all__ = ["node", "queue", "send"]
