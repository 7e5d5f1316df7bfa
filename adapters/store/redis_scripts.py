"""The Lua scripts behind every multi-key write of :class:`.redis_store.RedisStore`.

Each script is one atomic step on the server: a check (tenant exists, quota, newer version) and the
writes that depend on it happen with nothing interleaved, so two replicas can never both pass a
quota check or publish versions out of order. ``P`` is the key prefix, ``<T>`` a tenant, ``<I>`` a
prefix id; the key layout is documented in :mod:`.redis_store`.

Some scripts build key names from ``P`` themselves (a tenant's blobs and key records are not known
up front), so they need standalone Redis or a single shard, not Redis Cluster.
"""

from __future__ import annotations

# Make an already written blob the current version, check the quota, collect old versions, publish.
# KEYS: t:<T>, a:<T>, vs:<T>:<I>, the blob. ARGV: prefix id, version, VersionInfo JSON,
# size, keep_versions, blob key prefix, channel, event JSON. Returns {'ok'}, {'no_tenant'},
# {'no_blob'} (evicted), {'raced'} (a newer version is already current) or
# {'quota', adapters, bytes}; after any refusal the blob is gone and nothing else has changed.
PUBLISH = """
if redis.call('EXISTS', KEYS[1]) == 0 then redis.call('DEL', KEYS[4]); return {'no_tenant'} end
if redis.call('EXISTS', KEYS[4]) == 0 then return {'no_blob'} end
local v = tonumber(ARGV[2])
local old = redis.call('HGET', KEYS[2], ARGV[1])
local old_size, old_v, n = 0, 0, redis.call('HLEN', KEYS[2]) + 1
if old then local o = cjson.decode(old); old_size = o['size']; old_v = o['version']; n = n - 1 end
if old_v >= v then redis.call('DEL', KEYS[4]); return {'raced'} end
local used = tonumber(redis.call('HGET', KEYS[1], 'bytes') or '0') - old_size + tonumber(ARGV[4])
local max_a = tonumber(redis.call('HGET', KEYS[1], 'max_adapters') or '0')
local max_b = tonumber(redis.call('HGET', KEYS[1], 'max_bytes') or '0')
if (max_a > 0 and n > max_a) or (max_b > 0 and used > max_b) then
  redis.call('DEL', KEYS[4])
  return {'quota', string.format('%d', n), string.format('%d', used)}
end
redis.call('HSET', KEYS[3], ARGV[2], ARGV[3])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[3])
redis.call('HSET', KEYS[1], 'bytes', string.format('%d', used))
local nums = {}
for _, x in ipairs(redis.call('HKEYS', KEYS[3])) do table.insert(nums, tonumber(x)) end
table.sort(nums)
for i = 1, #nums - tonumber(ARGV[5]) do
  if nums[i] ~= v then
    redis.call('HDEL', KEYS[3], string.format('%d', nums[i]))
    redis.call('DEL', ARGV[6] .. string.format('%d', nums[i]))
  end
end
redis.call('PUBLISH', ARGV[7], ARGV[8])
return {'ok'}
"""

# Unpublish an adapter, release its bytes and drop all its versions (the version counter stays).
# KEYS: t:<T>, a:<T>, vs:<T>:<I>. ARGV: prefix id, blob key prefix, channel, event JSON.
# Returns 1, or 0 if the adapter has no current version.
DELETE = """
local cur = redis.call('HGET', KEYS[2], ARGV[1])
if not cur then return 0 end
redis.call('HDEL', KEYS[2], ARGV[1])
redis.call('HINCRBY', KEYS[1], 'bytes', -cjson.decode(cur)['size'])
for _, v in ipairs(redis.call('HKEYS', KEYS[3])) do redis.call('DEL', ARGV[2] .. v) end
redis.call('DEL', KEYS[3])
redis.call('PUBLISH', ARGV[3], ARGV[4])
return 1
"""

# Remove a tenant with its adapters, blobs, key records and counters; publish a delete per adapter.
# KEYS: tenants, t:<T>, a:<T>, tk:<T>, seq:<T>. ARGV: tenant, key prefix P,
# channel. Returns 1, or 0 if there is no such tenant.
DELETE_TENANT = """
if redis.call('EXISTS', KEYS[2]) == 0 then return 0 end
local t, p = ARGV[1], ARGV[2]
for _, id in ipairs(redis.call('HKEYS', KEYS[3])) do
  local vs = p .. 'vs:' .. t .. ':' .. id
  for _, v in ipairs(redis.call('HKEYS', vs)) do redis.call('DEL', p .. 'b:' .. t .. ':' .. id .. ':' .. v) end
  redis.call('DEL', vs)
  redis.call('PUBLISH', ARGV[3], cjson.encode({t = t, p = id, v = cjson.null}))
end
for _, k in ipairs(redis.call('SMEMBERS', KEYS[4])) do redis.call('DEL', p .. 'k:' .. k) end
redis.call('DEL', KEYS[2], KEYS[3], KEYS[4], KEYS[5])
redis.call('SREM', KEYS[1], t)
return 1
"""

# Store a new API key record: with a new tenant (create), replacing the tenant's keys (rotate)
# or next to them (keep).
# KEYS: tenants, t:<T>, tk:<T>, k:<new key id>. ARGV: tenant, mode, key record JSON,
# new key id, max_adapters, max_bytes, created, key prefix P. Returns 1, or 0 if create found
# the tenant already there or another mode found it missing.
ISSUE_KEY = """
local exists = redis.call('EXISTS', KEYS[2]) == 1
if ARGV[2] == 'create' then
  if exists then return 0 end
  redis.call('HSET', KEYS[2], 'max_adapters', ARGV[5], 'max_bytes', ARGV[6], 'bytes', 0, 'created', ARGV[7])
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

# name -> source; RedisStore registers each once and runs it with EVALSHA afterwards
SCRIPTS = {
    "publish": PUBLISH,
    "delete": DELETE,
    "delete_tenant": DELETE_TENANT,
    "issue_key": ISSUE_KEY,
    "revoke_keys": REVOKE_KEYS,
    "set_quota": SET_QUOTA,
}
