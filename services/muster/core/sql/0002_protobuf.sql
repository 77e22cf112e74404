-- Protobuf wire encoding inside the database, for event payloads whose values are only known
-- there (the database's now(), a fencing token bumped in the same statement): a service's SQL
-- function builds its event in the statement that makes the change, in one round trip.
-- Proto3 rules: a zero scalar or an empty string is omitted; a message field is always written
-- (presence). Values are non-negative (ids, tokens, times after 1970, durations).

CREATE FUNCTION core.pb_varint(v bigint) RETURNS bytea
LANGUAGE plpgsql IMMUTABLE STRICT PARALLEL SAFE AS $$
DECLARE
    out bytea := ''::bytea;
BEGIN
    IF v < 0 THEN
        RAISE EXCEPTION 'core.pb_varint: % is negative', v;
    END IF;
    WHILE v >= 128 LOOP
        out := out || set_byte('\x00'::bytea, 0, ((v & 127) | 128)::int);
        v := v >> 7;
    END LOOP;
    RETURN out || set_byte('\x00'::bytea, 0, v::int);
END $$;

-- A varint field (int64, enum, bool as 0/1).
CREATE FUNCTION core.pb_int(f int, v bigint) RETURNS bytea
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE AS $$
    SELECT CASE WHEN v = 0 THEN ''::bytea ELSE core.pb_varint(f::bigint << 3) || core.pb_varint(v) END
$$;

-- An embedded message field, written even when empty.
CREATE FUNCTION core.pb_message(f int, v bytea) RETURNS bytea
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE AS $$
    SELECT core.pb_varint((f::bigint << 3) | 2) || core.pb_varint(length(v)) || v
$$;

-- A string field (UTF-8), omitted when empty.
CREATE FUNCTION core.pb_string(f int, v text) RETURNS bytea
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE AS $$
    SELECT CASE WHEN v = '' THEN ''::bytea ELSE core.pb_message(f, convert_to(v, 'UTF8')) END
$$;

-- A google.protobuf.Timestamp field (microsecond precision, as PostgreSQL keeps it).
CREATE FUNCTION core.pb_timestamp(f int, t timestamptz) RETURNS bytea
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE AS $$
    SELECT core.pb_message(f, core.pb_int(1, us / 1000000) || core.pb_int(2, (us % 1000000) * 1000))
    FROM (SELECT (extract(epoch FROM t) * 1000000)::bigint AS us) x
$$;

-- A google.protobuf.Duration field.
CREATE FUNCTION core.pb_duration(f int, d interval) RETURNS bytea
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE AS $$
    SELECT core.pb_message(f, core.pb_int(1, us / 1000000) || core.pb_int(2, (us % 1000000) * 1000))
    FROM (SELECT (extract(epoch FROM d) * 1000000)::bigint AS us) x
$$;
