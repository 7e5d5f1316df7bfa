"""The Lua scripts behind every multi-key write of :class:`.redis_store.RedisStore`.

Each script is one atomic step on the server: a check (tenant exists, quota, newer version) and the
writes that depend on it happen with nothing interleaved, so two replicas can never both pass a
quota check or publish versions out of order. ``P`` is the key prefix, ``<T>`` a tenant, ``<I>`` a
prefix id; the key layout is documented in :mod:`.redis_store`. Times come from the server's
``TIME`` (one clock for every replica).

Some scripts build key names from ``P`` themselves (a tenant's blobs and key records are not known
up front), so they need standalone Redis or a single shard, not Redis Cluster.
"""

from __future__ import annotations

# Lua helpers prepended to the scripts that need them.
_NOW = """
local function now_s() local t = redis.call('TIME'); return tonumber(t[1]) + tonumber(t[2]) / 1000000 end
"""

# Delete the blobs of puts that reserved a version more than max_age seconds ago and never published
# it (the writer crashed between the blob and the publish). Members of pend:<T> are '<I>:<n>'; a
# blob that a version record names is published and stays. At most 256 per call (bounded script).
_COLLECT_PENDING = """
local function collect_pending(pend, p, t, max_age, now)
  local n = 0
  for _, m in ipairs(redis.call('ZRANGEBYSCORE', pend, '-inf', now - max_age, 'LIMIT', 0, 256)) do
    local id, v = string.match(m, '^(.+):(%d+)$')
    if id and redis.call('HEXISTS', p .. 'vs:' .. t .. ':' .. id, v) == 0 then
      redis.call('DEL', p .. 'b:' .. t .. ':' .. m)
      n = n + 1
    end
    redis.call('ZREM', pend, m)
  end
  return n
end
"""

# Allocate the next version of an id: record it as pending and hold its blob key with the
# PLACEHOLDER (before any blob byte is written), collecting stale pending blobs of the tenant on the
# way. Versions go above the id's counter and above the tenant's base (the floor when it was
# created: numbers a deleted namesake used). The writer then fills the placeholder with
# WATCH/MULTI/SET XX/EXEC, so a placeholder deleted meanwhile (delete_tenant, the orphan collector)
# makes the write fail instead of leaving an unlisted blob. (Not a script: a blob passed through Lua
# costs ~8 ms of server time per 4 MB, against ~10 us for a plain SET.)
# KEYS: t:<T>, seq:<T>, pend:<T>. ARGV: prefix id, P, tenant, orphan max age (s), placeholder.
# Returns the version, -1 if there is no such tenant, or -2 if the blob key was taken (try again).
RESERVE = (
    _NOW
    + _COLLECT_PENDING
    + """
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
local now = now_s()
collect_pending(KEYS[3], ARGV[2], ARGV[3], tonumber(ARGV[4]), now)
local cur = tonumber(redis.call('HGET', KEYS[2], ARGV[1]) or '0')
local base = tonumber(redis.call('HGET', KEYS[1], 'vbase') or '0')
local v = string.format('%d', math.max(cur, base) + 1)
redis.call('HSET', KEYS[2], ARGV[1], v)
if not redis.call('SET', ARGV[2] .. 'b:' .. ARGV[3] .. ':' .. ARGV[1] .. ':' .. v, ARGV[5], 'NX') then return -2 end
redis.call('ZADD', KEYS[3], now, ARGV[1] .. ':' .. v)
return tonumber(v)
"""
)

# Make a written blob (its size must match: not a placeholder) the current version, clear the pin,
# check the quota, apply retention, collect versions whose grace has passed, publish. Retention:
# the newest keep_versions versions that are not superseded stay, and so does the version pinned
# until this publish; older ones are scored into gr:<T>:<I> with the time they were superseded and
# stay fetchable until grace_s has passed, then a later publish deletes their record and blob.
# KEYS: t:<T>, a:<T>, vs:<T>:<I>, the blob, gr:<T>:<I>, pend:<T>, pin:<T>. ARGV: prefix id, version,
# VersionInfo JSON, size, keep_versions, blob key prefix, channel, event JSON, grace_s, pending
# member. Returns {'ok'} (also for a replay whose first reply was lost), {'no_tenant'}, {'no_blob'}
# (evicted or collected), {'raced'} (a newer version is already current) or {'quota', adapters,
# bytes}; after any refusal the blob and its pending marker are gone and nothing else has changed.
PUBLISH = (
    _NOW
    + """
if redis.call('HEXISTS', KEYS[3], ARGV[2]) == 1 then return {'ok'} end
local function refuse(...)
  redis.call('DEL', KEYS[4])
  redis.call('ZREM', KEYS[6], ARGV[10])
  return {...}
end
if redis.call('EXISTS', KEYS[1]) == 0 then return refuse('no_tenant') end
if redis.call('STRLEN', KEYS[4]) ~= tonumber(ARGV[4]) then return refuse('no_blob') end
local v = tonumber(ARGV[2])
local old = redis.call('HGET', KEYS[2], ARGV[1])
local old_size, old_v, n = 0, 0, redis.call('HLEN', KEYS[2]) + 1
if old then local o = cjson.decode(old); old_size = o['size']; old_v = o['version']; n = n - 1 end
if old_v >= v then return refuse('raced') end
local used = tonumber(redis.call('HGET', KEYS[1], 'bytes') or '0') - old_size + tonumber(ARGV[4])
local max_a = tonumber(redis.call('HGET', KEYS[1], 'max_adapters') or '0')
local max_b = tonumber(redis.call('HGET', KEYS[1], 'max_bytes') or '0')
if (max_a > 0 and n > max_a) or (max_b > 0 and used > max_b) then
  return refuse('quota', string.format('%d', n), string.format('%d', used))
end
local now = now_s()
redis.call('HSET', KEYS[3], ARGV[2], ARGV[3])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[3])
redis.call('HSET', KEYS[1], 'bytes', string.format('%d', used))
redis.call('ZREM', KEYS[6], ARGV[10])
local pinned = redis.call('HGET', KEYS[7], ARGV[1])
local protect = pinned and cjson.decode(pinned)['version']
redis.call('HDEL', KEYS[7], ARGV[1])
local kept = {}
for _, x in ipairs(redis.call('HKEYS', KEYS[3])) do
  if not redis.call('ZSCORE', KEYS[5], x) then table.insert(kept, tonumber(x)) end
end
table.sort(kept)
for i = 1, #kept - tonumber(ARGV[5]) do
  if kept[i] ~= protect then redis.call('ZADD', KEYS[5], now, string.format('%d', kept[i])) end
end
for _, x in ipairs(redis.call('ZRANGEBYSCORE', KEYS[5], '-inf', now - tonumber(ARGV[9]))) do
  redis.call('HDEL', KEYS[3], x)
  redis.call('DEL', ARGV[6] .. x)
  redis.call('ZREM', KEYS[5], x)
end
redis.call('PUBLISH', ARGV[7], ARGV[8])
return {'ok'}
"""
)

# Undo a put that failed after reserving: delete its blob unless a version record names it (the
# publish did run and only its reply was lost), and its pending marker.
# KEYS: vs:<T>:<I>, the blob, pend:<T>. ARGV: version, pending member. Returns 1.
ABANDON = """
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 0 then redis.call('DEL', KEYS[2]) end
redis.call('ZREM', KEYS[3], ARGV[2])
return 1
"""

# Collect a tenant's stale pending blobs (what RESERVE does on every put).
# KEYS: pend:<T>. ARGV: P, tenant, max age (s). Returns the number of blobs deleted.
COLLECT_ORPHANS = (
    _NOW
    + _COLLECT_PENDING
    + """
return collect_pending(KEYS[1], ARGV[1], ARGV[2], tonumber(ARGV[3]), now_s())
"""
)

# Unpublish an adapter, release its bytes, drop its pin and all its versions, in their grace window
# too (the version counter stays). KEYS: t:<T>, a:<T>, vs:<T>:<I>, gr:<T>:<I>, pin:<T>. ARGV: prefix
# id, blob key prefix, channel, event JSON. Returns 1, or 0 if the adapter has no current version.
DELETE = """
local cur = redis.call('HGET', KEYS[2], ARGV[1])
if not cur then return 0 end
redis.call('HDEL', KEYS[2], ARGV[1])
redis.call('HDEL', KEYS[5], ARGV[1])
redis.call('HINCRBY', KEYS[1], 'bytes', -cjson.decode(cur)['size'])
for _, v in ipairs(redis.call('HKEYS', KEYS[3])) do redis.call('DEL', ARGV[2] .. v) end
redis.call('DEL', KEYS[3], KEYS[4])
redis.call('PUBLISH', ARGV[3], ARGV[4])
return 1
"""

# Remove a tenant with its adapters, blobs (pending ones too), key records and counters; publish a
# delete per adapter. First raise the store's version floor to the highest number the tenant used,
# so that a tenant created later under the same name numbers above it (its caches can never match).
# KEYS: tenants, t:<T>, a:<T>, tk:<T>, seq:<T>, pend:<T>, vfloor, pin:<T>. ARGV: tenant, key prefix P,
# channel. Returns 1, or 0 if there is no such tenant.
DELETE_TENANT = """
if redis.call('EXISTS', KEYS[2]) == 0 then return 0 end
local t, p = ARGV[1], ARGV[2]
local top = tonumber(redis.call('HGET', KEYS[2], 'vbase') or '0')
for _, n in ipairs(redis.call('HVALS', KEYS[5])) do top = math.max(top, tonumber(n)) end
for _, id in ipairs(redis.call('HKEYS', KEYS[3])) do
  local vs = p .. 'vs:' .. t .. ':' .. id
  for _, v in ipairs(redis.call('HKEYS', vs)) do redis.call('DEL', p .. 'b:' .. t .. ':' .. id .. ':' .. v) end
  redis.call('DEL', vs, p .. 'gr:' .. t .. ':' .. id)
  redis.call('PUBLISH', ARGV[3], cjson.encode({t = t, p = id, v = cjson.null}))
end
for _, m in ipairs(redis.call('ZRANGE', KEYS[6], 0, -1)) do redis.call('DEL', p .. 'b:' .. t .. ':' .. m) end
for _, k in ipairs(redis.call('SMEMBERS', KEYS[4])) do redis.call('DEL', p .. 'k:' .. k) end
redis.call('DEL', KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[8])
redis.call('SREM', KEYS[1], t)
-- after the deletes: under maxmemory a script that has already written may go on writing
if top > tonumber(redis.call('GET', KEYS[7]) or '0') then redis.call('SET', KEYS[7], string.format('%d', top)) end
return 1
"""

# Serve a kept version (published, not dropped by retention) instead of the newest: copy its
# record verbatim into pin:<T> (no cjson round trip: that would round the float timestamps).
# KEYS: a:<T>, vs:<T>:<I>, gr:<T>:<I>, pin:<T>. ARGV: prefix id, version, channel, event JSON.
# Returns the pinned record, or nil if the adapter or that kept version does not exist.
PIN = """
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 0 then return false end
local rec = redis.call('HGET', KEYS[2], ARGV[2])
if not rec or redis.call('ZSCORE', KEYS[3], ARGV[2]) then return false end
redis.call('HSET', KEYS[4], ARGV[1], rec)
redis.call('PUBLISH', ARGV[3], ARGV[4])
return rec
"""

# Serve the newest version again. KEYS: a:<T>, pin:<T>. ARGV: prefix id, channel, tenant.
# Returns the newest record (the pointer), or nil if the adapter does not exist.
UNPIN = """
local cur = redis.call('HGET', KEYS[1], ARGV[1])
if not cur then return false end
if redis.call('HDEL', KEYS[2], ARGV[1]) == 1 then
  redis.call('PUBLISH', ARGV[2], cjson.encode({t = ARGV[3], p = ARGV[1], v = cjson.decode(cur)['version']}))
end
return cur
"""

# Store a new API key record: with a new tenant (create), replacing the tenant's keys (rotate)
# or next to them (keep). A new tenant's version base is the store's version floor.
# KEYS: tenants, t:<T>, tk:<T>, k:<new key id>, vfloor. ARGV: tenant, mode, key record JSON,
# new key id, max_adapters, max_bytes, created, key prefix P. Returns 1, or 0 if create found
# the tenant already there or another mode found it missing.
ISSUE_KEY = """
local exists = redis.call('EXISTS', KEYS[2]) == 1
if ARGV[2] == 'create' then
  if exists then return 0 end
  redis.call('HSET', KEYS[2], 'max_adapters', ARGV[5], 'max_bytes', ARGV[6], 'bytes', 0, 'created', ARGV[7],
             'vbase', redis.call('GET', KEYS[5]) or '0')
  redis.call('SADD', KEYS[1], ARGV[1])
elseif not exists then return 0
elseif ARGV[2] == 'rotate' then
  for _, k in ipairs(redis.call('SMEMBERS', KEYS[3])) do redis.call('DEL', ARGV[8] .. 'k:' .. k) end
  redis.call('DEL', KEYS[3])
end
local r = cjson.decode(ARGV[3])
redis.call('HSET', KEYS[4], 'key_id', r['key_id'], 'tenant', r['tenant'], 'salt', r['salt'], 'hash', r['hash'],
           'created', ARGV[7])
redis.call('SADD', KEYS[3], ARGV[4])
return 1
"""

# Revoke one of a tenant's keys, or all of them.
# KEYS: t:<T>, tk:<T>. ARGV: key prefix P, key id ('': all). Returns the number
# revoked, or -1 if there is no such tenant.
REVOKE_KEYS = """
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
local ids = redis.call('SMEMBERS', KEYS[2])
local n = 0
for _, k in ipairs(ids) do
  if ARGV[2] == '' or ARGV[2] == k then
    redis.call('SREM', KEYS[2], k); redis.call('DEL', ARGV[1] .. 'k:' .. k); n = n + 1
  end
end
return n
"""

# Change a tenant's quota (usage is untouched; the next put is checked against it).
# KEYS: t:<T>. ARGV: max_adapters, max_bytes. Returns 1, or 0 if there is no such tenant.
SET_QUOTA = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], 'max_adapters', ARGV[1], 'max_bytes', ARGV[2])
return 1
"""

# Set or clear one group of a tenant's limits (rate limits ``rl_*``, training limits ``tl_*``): all its fields
# or none (none: the server's default applies). KEYS: t:<T>. ARGV: the field names, then (to set) their values
# in the same order. Returns 1, or 0 if there is no such tenant.
SET_LIMIT_FIELDS = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local n = tonumber(ARGV[1])
if #ARGV == 1 + 2 * n then
  for i = 2, n + 1 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + n]) end
else
  for i = 2, n + 1 do redis.call('HDEL', KEYS[1], ARGV[i]) end
end
return 1
"""

# name -> source; RedisStore registers each once and runs it with EVALSHA afterwards
SCRIPTS = {
    "reserve": RESERVE,
    "publish": PUBLISH,
    "abandon": ABANDON,
    "collect_orphans": COLLECT_ORPHANS,
    "delete": DELETE,
    "pin": PIN,
    "unpin": UNPIN,
    "delete_tenant": DELETE_TENANT,
    "issue_key": ISSUE_KEY,
    "revoke_keys": REVOKE_KEYS,
    "set_quota": SET_QUOTA,
    "set_limit_fields": SET_LIMIT_FIELDS,
}
