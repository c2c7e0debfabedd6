-- Marks the start of the schema; the tables come in the migrations that follow.
CREATE TABLE IF NOT EXISTS credscope_info (key TEXT PRIMARY KEY, value TEXT NOT NULL);
INSERT OR IGNORE INTO credscope_info (key, value) VALUES ('schema', 'credscope');
