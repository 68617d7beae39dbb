-- Run by pgrelay on the leader, once per database (and again after DDL on functions passes
-- through pgrelay): the user-defined volatile functions and procedures. A call to one of them
-- may write, so a statement that calls one runs on the leader.
SELECT DISTINCT lower(proname)
FROM pg_proc p
JOIN pg_namespace n ON n.oid = p.pronamespace
WHERE p.provolatile = 'v'
  AND n.nspname NOT IN ('pg_catalog', 'information_schema')
