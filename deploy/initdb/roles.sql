-- Run by the postgres image on the first start of every node: roles are not replicated, so the
-- application's role exists everywhere.
CREATE ROLE app LOGIN PASSWORD 'app';
