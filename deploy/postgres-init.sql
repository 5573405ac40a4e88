-- Run once by the postgres image on an empty data volume (docker-entrypoint-initdb.d).
-- Each segtrain service owns its tables, so each gets its own database; the services create
-- their tables themselves at start-up.
CREATE DATABASE pipeline;
CREATE DATABASE metrics;
