-- A load for sqlite3 under memshadow-run (tests/preload.rs): a 256 MiB page cache filled
-- by inserts, updates, deletes, an index, a sort into a second table and a VACUUM, with
-- output that depends on nothing but the data. At each quiet point a shell prints
-- "QUIET n" and waits for a line from the FIFO named by $QUIET_FIFO; sqlite3 waits for it.
PRAGMA cache_size = -262144;
PRAGMA temp_store = MEMORY;
CREATE TABLE t(id INTEGER PRIMARY KEY, k INTEGER, v TEXT);
WITH RECURSIVE c(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM c WHERE i < 150000)
INSERT INTO t SELECT i, (i * 7919) % 100003, printf('%0200d', i) FROM c;
CREATE INDEX tk ON t(k);
SELECT count(*), sum(k), max(length(v)) FROM t;
.shell echo QUIET 0; read x < "$QUIET_FIFO"
UPDATE t SET v = printf('%0300d', id * 3) WHERE id % 3 = 0;
DELETE FROM t WHERE id % 5 = 0;
SELECT count(*), sum(k), sum(length(v)) FROM t;
CREATE TABLE u AS SELECT * FROM t ORDER BY k DESC, id;
SELECT count(*), min(id), max(id) FROM u;
.shell echo QUIET 1; read x < "$QUIET_FIFO"
SELECT k % 10, count(*), sum(length(v)) FROM t GROUP BY 1 ORDER BY 1;
DROP INDEX tk;
DELETE FROM u WHERE id % 2 = 0;
VACUUM;
SELECT sum(t.id), count(*) FROM t JOIN u USING (id);
.shell echo QUIET 2; read x < "$QUIET_FIFO"
SELECT count(*) FROM t WHERE v LIKE '%999%';
.exit 4
