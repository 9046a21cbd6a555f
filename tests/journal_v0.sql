-- The schema of the last release before versioned migrations (commit 30d8ef0), as its
-- create_all wrote it to SQLite. tests/test_journal_schema.py migrates a journal made from it.
CREATE TABLE ticks (
	tick_id VARCHAR(64) NOT NULL, 
	persona_id VARCHAR(255) NOT NULL, 
	window VARCHAR(32) NOT NULL, 
	state VARCHAR(16) NOT NULL, 
	outcome VARCHAR(32), 
	attempts INTEGER NOT NULL, 
	next_attempt_at FLOAT, 
	last_error TEXT, 
	created_at FLOAT NOT NULL, 
	updated_at FLOAT NOT NULL, 
	PRIMARY KEY (tick_id)
);
CREATE INDEX ix_ticks_persona_id ON ticks (persona_id);
CREATE TABLE calls (
	tick_id VARCHAR(64) NOT NULL, 
	seq INTEGER NOT NULL, 
	tool_name VARCHAR(255) NOT NULL, 
	input_hash VARCHAR(16), 
	status VARCHAR(16) NOT NULL, 
	error_message TEXT, 
	latency_ms INTEGER, 
	PRIMARY KEY (tick_id, seq)
);
CREATE TABLE ratings (
	tick_id VARCHAR(64) NOT NULL, 
	module VARCHAR(255) NOT NULL, 
	rating INTEGER NOT NULL, 
	notes TEXT, 
	PRIMARY KEY (tick_id, module)
);
CREATE TABLE login_blocks (
	persona_id VARCHAR(255) NOT NULL, 
	secret_fingerprint VARCHAR(32) NOT NULL, 
	reason TEXT NOT NULL, 
	created_at FLOAT NOT NULL, 
	email VARCHAR(320), 
	PRIMARY KEY (persona_id, secret_fingerprint)
);
CREATE TABLE personal_spaces (
	persona_id VARCHAR(255) NOT NULL, 
	space_id VARCHAR(255) NOT NULL, 
	resolved_at FLOAT NOT NULL, 
	PRIMARY KEY (persona_id)
);
CREATE TABLE tick_spaces (
	tick_id VARCHAR(64) NOT NULL, 
	persona_id VARCHAR(255) NOT NULL, 
	space_id VARCHAR(255) NOT NULL, 
	via VARCHAR(16) NOT NULL, 
	at FLOAT NOT NULL, 
	PRIMARY KEY (tick_id)
);
CREATE TABLE batches (
	id INTEGER NOT NULL, 
	tick_id VARCHAR(64) NOT NULL, 
	persona_id VARCHAR(255) NOT NULL, 
	kind VARCHAR(16) NOT NULL, 
	body BLOB NOT NULL, 
	rows INTEGER NOT NULL, 
	state VARCHAR(16) NOT NULL, 
	attempts INTEGER NOT NULL, 
	last_error TEXT, 
	created_at FLOAT NOT NULL, 
	delivered_at FLOAT, 
	next_attempt_at FLOAT, 
	PRIMARY KEY (id)
);
CREATE INDEX ix_batches_state ON batches (state);
CREATE INDEX ix_batches_tick_id ON batches (tick_id);
CREATE TABLE ready_probe (at REAL);
