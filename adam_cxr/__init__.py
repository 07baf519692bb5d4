"""adam_cxr: the pieces beside the method that adam.py, data_prep.py, finetune.py, eve.py and ablate.py share.

    runs        the run folder: args.json, log.jsonl, checkpoints, exports, resume, flag types
    monitor     the embedding monitor of pretraining and curves.png
    gpu_views   both views of a whole batch made on the training device

and the pieces behind data_prep.py, one responsibility each: safe_files (runs.py writes with it too), decode,
caches, phantom, open_data, convert, scanners, tables (data_prep.py's docstring says what each holds).

They live in one package so that an installed environment gets no generic top-level names (`runs`, `monitor`).
"""
