-- The state store of release 0.1 (commit 77e938d), as its SQLAlchemy models created it.
CREATE TABLE studies (
	study_uid VARCHAR(64) NOT NULL, 
	state VARCHAR(9) NOT NULL, 
	patient_id VARCHAR(64), 
	patient_name VARCHAR(324), 
	study_date VARCHAR(8), 
	study_time VARCHAR(16), 
	accession_number VARCHAR(16), 
	study_description VARCHAR(64), 
	calling_ae VARCHAR(16), 
	created_at DATETIME NOT NULL, 
	opened_at DATETIME NOT NULL, 
	last_received_at DATETIME NOT NULL, 
	completed_at DATETIME, 
	PRIMARY KEY (study_uid)
);
CREATE TABLE jobs (
	id INTEGER NOT NULL, 
	study_uid VARCHAR(64) NOT NULL, 
	series_uid VARCHAR(64) NOT NULL, 
	rule VARCHAR(128) NOT NULL, 
	action VARCHAR(16) NOT NULL, 
	models JSON NOT NULL, 
	outputs JSON NOT NULL, 
	destinations JSON NOT NULL, 
	instance_count INTEGER NOT NULL, 
	version INTEGER NOT NULL, 
	priority INTEGER NOT NULL, 
	not_before DATETIME, 
	state VARCHAR(17) NOT NULL, 
	attempts INTEGER NOT NULL, 
	error TEXT, 
	timings JSON NOT NULL, 
	options JSON NOT NULL, 
	created_at DATETIME NOT NULL, 
	started_at DATETIME, 
	finished_at DATETIME, 
	PRIMARY KEY (id)
);
CREATE INDEX ix_jobs_state ON jobs (state);
CREATE INDEX ix_jobs_study_uid ON jobs (study_uid);
CREATE TABLE events (
	id INTEGER NOT NULL, 
	at DATETIME NOT NULL, 
	kind VARCHAR(32) NOT NULL, 
	study_uid VARCHAR(64), 
	job_id INTEGER, 
	detail TEXT NOT NULL, 
	PRIMARY KEY (id)
);
CREATE TABLE series (
	series_uid VARCHAR(64) NOT NULL, 
	study_uid VARCHAR(64) NOT NULL, 
	modality VARCHAR(16), 
	series_number INTEGER, 
	series_description VARCHAR(64), 
	body_part_examined VARCHAR(16), 
	tags JSON NOT NULL, 
	source VARCHAR(8) NOT NULL, 
	PRIMARY KEY (series_uid), 
	FOREIGN KEY(study_uid) REFERENCES studies (study_uid)
);
CREATE INDEX ix_series_study_uid ON series (study_uid);
CREATE TABLE outputs (
	id INTEGER NOT NULL, 
	job_id INTEGER NOT NULL, 
	kind VARCHAR(16) NOT NULL, 
	sop_instance_uid VARCHAR(64) NOT NULL, 
	series_uid VARCHAR(64) NOT NULL, 
	path TEXT NOT NULL, 
	PRIMARY KEY (id), 
	FOREIGN KEY(job_id) REFERENCES jobs (id)
);
CREATE INDEX ix_outputs_job_id ON outputs (job_id);
CREATE TABLE instances (
	id INTEGER NOT NULL, 
	sop_instance_uid VARCHAR(64) NOT NULL, 
	sop_class_uid VARCHAR(64) NOT NULL, 
	series_uid VARCHAR(64) NOT NULL, 
	study_uid VARCHAR(64) NOT NULL, 
	instance_number INTEGER, 
	transfer_syntax VARCHAR(64) NOT NULL, 
	path TEXT NOT NULL, 
	size INTEGER NOT NULL, 
	received_at DATETIME NOT NULL, 
	calling_ae VARCHAR(16), 
	called_ae VARCHAR(16), 
	source_address VARCHAR(64), 
	source VARCHAR(8) NOT NULL, 
	PRIMARY KEY (id), 
	UNIQUE (sop_instance_uid), 
	FOREIGN KEY(series_uid) REFERENCES series (series_uid)
);
CREATE INDEX ix_instances_series_uid ON instances (series_uid);
CREATE INDEX ix_instances_study_uid ON instances (study_uid);
CREATE TABLE deliveries (
	id INTEGER NOT NULL, 
	output_id INTEGER NOT NULL, 
	destination VARCHAR(64) NOT NULL, 
	state VARCHAR(7) NOT NULL, 
	attempts INTEGER NOT NULL, 
	next_attempt_at DATETIME NOT NULL, 
	last_status TEXT, 
	updated_at DATETIME NOT NULL, 
	commitment VARCHAR(16), 
	transaction_uid VARCHAR(64), 
	PRIMARY KEY (id), 
	FOREIGN KEY(output_id) REFERENCES outputs (id)
);
CREATE INDEX ix_deliveries_state ON deliveries (state);
CREATE INDEX ix_deliveries_transaction_uid ON deliveries (transaction_uid);
CREATE INDEX ix_deliveries_output_id ON deliveries (output_id);
