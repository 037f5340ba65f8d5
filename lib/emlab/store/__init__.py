"""Storage: where every file lives and how it is written and read back.

    paths.py     every file name an experiment writes, the caches, the repository root
    files.py     files that appear complete or not at all; JSONL/JSON writers
    records.py   the typed records that flow between stages (`Answer`, `Judgment`)
    runinfo.py   what a run folder records about how it was made, and the params guard
    sqlite.py    one SQLite file shared by threads (the judge and completion caches)
"""
