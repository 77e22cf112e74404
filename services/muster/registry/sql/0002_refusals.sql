-- A refused node's explanation: what is wrong and what fixes it (never key material).
ALTER TABLE registry.nodes
    ADD COLUMN state_message text NOT NULL DEFAULT '',
    ADD COLUMN state_details jsonb NOT NULL DEFAULT '{}';
