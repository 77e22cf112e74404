-- The request id of the claim that holds a firing: a retried ClaimFiring (its answer was lost)
-- gets the same claim back instead of FIRING_CLAIMED by itself.
ALTER TABLE locks.firings ADD COLUMN claim_request_id text NOT NULL DEFAULT '';
