-- Run on the leader only: pgrelay creates the database on the followers and copies it there.
CREATE DATABASE app OWNER app;
