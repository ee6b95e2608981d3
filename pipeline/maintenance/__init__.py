"""Store maintenance: `lifecycle` (`oracle-farm ls` and `gc`: what a store root holds, and removing what no
config reaches) and `exchange` (`oracle-farm import-margins` and `export`: margins in and arrays out).

It reads the stage identities of `pipeline.plan`; the report (imported rows) and the run (what a
config reaches) read it in turn. Nothing is re-exported here.
"""
