"""The Lua scripts behind the Redis store's training side (:mod:`.redis_jobs`; key layout there).

Only writes whose check and effect involve several keys are scripts: ``create_job`` (tenant and
dataset exist, the active-job limit, then the record and both indexes) and ``delete_dataset`` (not
used by an active job, then the record and the blob). Uploads are WATCH/MULTI instead (a blob of
tens of MB passed through Lua would block the server for as long as it takes to copy), and so are
``update_job`` / ``request_cancel`` (their read-modify-write runs :func:`.jobs.apply_update` in
Python: one implementation of the rules for both backends, and no cjson round trip that would
round the records' floats).

``delete_tenant`` runs the adapter side's script with :data:`PURGE_TRAINING` in front, so the
tenant's datasets and jobs go in the same atomic step as the tenant itself: no upload or job can
slip in between, and a namesake created later finds nothing.
"""

from __future__ import annotations

from .redis_scripts import DELETE_TENANT

# Queue a job. KEYS: t:<T>, ds:<T>, jact:<T>, jobs:<T>, job:<T>:<J>. ARGV: dataset id, max active jobs
# (0: unlimited), job id, JobRecord JSON, created (the zset score). Returns {'ok'}, {'no_tenant'},
# {'no_dataset'} or {'too_many', active jobs}; only 'ok' writes anything.
CREATE_JOB = """
if redis.call('EXISTS', KEYS[1]) == 0 then return {'no_tenant'} end
if redis.call('HEXISTS', KEYS[2], ARGV[1]) == 0 then return {'no_dataset'} end
local active = redis.call('HLEN', KEYS[3])
local max_active = tonumber(ARGV[2])
if max_active > 0 and active >= max_active then return {'too_many', string.format('%d', active)} end
redis.call('SET', KEYS[5], ARGV[4])
redis.call('HSET', KEYS[3], ARGV[3], ARGV[1])
redis.call('ZADD', KEYS[4], ARGV[5], ARGV[3])
return {'ok'}
"""

# Delete a dataset unless an active job uses it (jact:<T> maps active job ids to their datasets).
# KEYS: ds:<T>, dsb:<T>:<D>, jact:<T>. ARGV: dataset id. Returns {'ok'}, {'missing'} or {'in_use', job id}.
DELETE_DATASET = """
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 0 then return {'missing'} end
local active = redis.call('HGETALL', KEYS[3])
for i = 1, #active, 2 do
  if active[i + 1] == ARGV[1] then return {'in_use', active[i]} end
end
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('DEL', KEYS[2])
return {'ok'}
"""

# Prepended to the adapter side's DELETE_TENANT (same KEYS and ARGV: KEYS[2] is t:<T>, ARGV[1] the
# tenant, ARGV[2] the key prefix P): drop the tenant's dataset blobs, job records and indexes. Only
# reads and deletes, so it runs under maxmemory too, like the rest of that script.
PURGE_TRAINING = """
if redis.call('EXISTS', KEYS[2]) == 1 then
  local t, p = ARGV[1], ARGV[2]
  for _, d in ipairs(redis.call('HKEYS', p .. 'ds:' .. t)) do redis.call('DEL', p .. 'dsb:' .. t .. ':' .. d) end
  for _, j in ipairs(redis.call('ZRANGE', p .. 'jobs:' .. t, 0, -1)) do
    redis.call('DEL', p .. 'job:' .. t .. ':' .. j)
  end
  redis.call('DEL', p .. 'ds:' .. t, p .. 'jobs:' .. t, p .. 'jact:' .. t)
end
"""

# name -> source; the training mixin registers these next to the adapter side's scripts, replacing
# "delete_tenant" with the version that also purges training data
JOB_SCRIPTS = {
    "create_job": CREATE_JOB,
    "delete_dataset": DELETE_DATASET,
    "delete_tenant": PURGE_TRAINING + DELETE_TENANT,
}
