"""Lua scripts that change the Redis store's metadata atomically.

Each script checks its precondition (the index incarnation still exists, the writer's base version
is the newest one, every chunk of a snapshot is present) before its first write, so a rejected
script changes nothing. The `#!lua` line makes Redis reject a script up front when it is out of
memory or cannot persist (MISCONF), instead of failing half-way through it.

Keys of one index share the prefix passed as the "key base" argument (`<prefix>:index:<name>:<incarnation>:`):
`head` (hash: incarnation, version, snapshot, snapshot_version), `log` (stream of mutation entries
whose ids are `<version>-1`), `snapshot:<id>` (manifest, JSON) and `snapshot:<id>:<n>` (chunks).
"""

from __future__ import annotations

_HELPERS = """
local function snapshot_key(base, id)
  return base .. 'snapshot:' .. id
end

local function chunk_count(manifest)
  return tonumber(cjson.decode(manifest)['num_chunks'])
end

local function snapshot_complete(base, id)
  local key = snapshot_key(base, id)
  local manifest = redis.call('GET', key)
  if not manifest then return false end
  for i = 0, chunk_count(manifest) - 1 do
    if redis.call('EXISTS', key .. ':' .. i) == 0 then return false end
  end
  return true
end

local function drop_snapshot(base, id)
  local key = snapshot_key(base, id)
  local manifest = redis.call('GET', key)
  if manifest then
    for i = 0, chunk_count(manifest) - 1 do
      redis.call('UNLINK', key .. ':' .. i)
    end
  end
  redis.call('UNLINK', key)
end

-- Make a fully written snapshot the current one: keep its keys, drop the previous snapshot and
-- trim the log behind it. The entry of the snapshot's own version stays, so a replica blocked on
-- the log still sees an upload entry.
local function adopt_snapshot(head, log, base, id, version)
  local key = snapshot_key(base, id)
  local manifest = redis.call('GET', key)
  redis.call('PERSIST', key)
  for i = 0, chunk_count(manifest) - 1 do
    redis.call('PERSIST', key .. ':' .. i)
  end
  local previous = redis.call('HGET', head, 'snapshot')
  redis.call('HSET', head, 'snapshot', id, 'snapshot_version', version)
  if previous and previous ~= id then drop_snapshot(base, previous) end
  redis.call('XTRIM', log, 'MINID', version .. '-0')
end
"""

# KEYS: head, log. ARGV: incarnation, base version, new version, key base, snapshot id or '',
# then the entry's field/value pairs. Returns {'ok'}, {'missing'}, {'stale', version} or {'incomplete'}.
COMMIT = (
    "#!lua\n"
    + _HELPERS
    + """
if redis.call('HGET', KEYS[1], 'incarnation') ~= ARGV[1] then return {'missing'} end
local current = redis.call('HGET', KEYS[1], 'version')
if current ~= ARGV[2] then return {'stale', current} end
if ARGV[5] ~= '' and not snapshot_complete(ARGV[4], ARGV[5]) then return {'incomplete'} end
redis.call('XADD', KEYS[2], ARGV[3] .. '-1', unpack(ARGV, 6))
redis.call('HSET', KEYS[1], 'version', ARGV[3])
if ARGV[5] ~= '' then adopt_snapshot(KEYS[1], KEYS[2], ARGV[4], ARGV[5], ARGV[3]) end
return {'ok'}
"""
)

# KEYS: head, log. ARGV: incarnation, version, key base, snapshot id.
# Returns 'ok', 'missing', 'older' (a snapshot as new is current already), 'ahead' or 'incomplete'.
CHECKPOINT = (
    "#!lua\n"
    + _HELPERS
    + """
if redis.call('HGET', KEYS[1], 'incarnation') ~= ARGV[1] then return 'missing' end
local newest = tonumber(redis.call('HGET', KEYS[1], 'snapshot_version') or '-1')
if newest >= tonumber(ARGV[2]) then return 'older' end
if tonumber(redis.call('HGET', KEYS[1], 'version')) < tonumber(ARGV[2]) then return 'ahead' end
if not snapshot_complete(ARGV[3], ARGV[4]) then return 'incomplete' end
adopt_snapshot(KEYS[1], KEYS[2], ARGV[3], ARGV[4], ARGV[2])
return 'ok'
"""
)

# KEYS: indexes, catalog, head, log. ARGV: name, incarnation, catalog value, catalog max length,
# version, key base, snapshot id or '', then the first log entry's field/value pairs.
# Creates the index at `version`. With a snapshot id, the snapshot becomes its state, which is how a
# server writes an index back into a Redis that lost it. Returns 'ok', 'exists' or 'incomplete'.
CREATE = (
    "#!lua\n"
    + _HELPERS
    + """
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 1 then return 'exists' end
if ARGV[7] ~= '' and not snapshot_complete(ARGV[6], ARGV[7]) then return 'incomplete' end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
redis.call('HSET', KEYS[3], 'incarnation', ARGV[2], 'version', ARGV[5])
redis.call('XADD', KEYS[4], ARGV[5] .. '-1', unpack(ARGV, 8))
if ARGV[7] ~= '' then adopt_snapshot(KEYS[3], KEYS[4], ARGV[6], ARGV[7], ARGV[5]) end
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[4], '*', 'kind', 'create', 'name', ARGV[1], 'incarnation', ARGV[2])
return 'ok'
"""
)

# KEYS: indexes, catalog, head, log, refit lock, snapshot lock. ARGV: name, incarnation, key base,
# catalog max length. Returns 'ok' or 'missing' (no index of that incarnation).
DELETE = (
    "#!lua\n"
    + _HELPERS
    + """
local value = redis.call('HGET', KEYS[1], ARGV[1])
if not value or cjson.decode(value)['incarnation'] ~= ARGV[2] then return 'missing' end
redis.call('HDEL', KEYS[1], ARGV[1])
local current = redis.call('HGET', KEYS[3], 'snapshot')
if current then drop_snapshot(ARGV[3], current) end
redis.call('UNLINK', KEYS[3], KEYS[4], KEYS[5], KEYS[6])
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[4], '*', 'kind', 'delete', 'name', ARGV[1], 'incarnation', ARGV[2])
return 'ok'
"""
)

# KEYS: none. ARGV: key base, snapshot id. Deletes a snapshot that never became current.
DROP_SNAPSHOT = (
    "#!lua\n"
    + _HELPERS
    + """
drop_snapshot(ARGV[1], ARGV[2])
return 'ok'
"""
)

# KEYS: lock. ARGV: token, milliseconds. Extends the lock only while this holder owns it.
RENEW_LOCK = """#!lua
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""

# KEYS: lock. ARGV: token. Releases the lock only while this holder owns it.
RELEASE_LOCK = """#!lua
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
