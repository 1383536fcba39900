//! The Lua scripts cluster mode runs in Redis. Each runs atomically, which is what makes the
//! cluster's guarantees hold: numbering and publishing happen in one step, so the order in which
//! Redis publishes messages on a channel is the order of their seqs.
//!
//! They are sent with EVALSHA (redis-rs `Script` falls back to loading them after a Redis
//! restart). Some read keys they do not declare (the node hashes): fine on a standalone Redis or
//! a replicated one, not on Redis Cluster, which roomcast does not support.

use std::sync::LazyLock;

use redis::Script;

/// Numbers, publishes and keeps one chat message.
///
/// KEYS[1]: the room's seq key; KEYS[2]: the room's history list; KEYS[3]: the room's epoch
/// key. ARGV: channel, floor, body, key TTL (ms), need subscribers (`1`: publish only if some
/// process is subscribed to the channel; answer 0 otherwise), history depth (0: keep nothing),
/// a fresh epoch.
///
/// `floor` is the publisher's own last seq of the room: after a Redis restart (or the seq key's
/// expiry) numbering resumes above it instead of starting again at 1. When the numbering was
/// lost (no seq key, or one that is not a seq: Redis is not trusted either) or there is no
/// epoch, the room starts a new epoch (the fresh one given) and its old list goes: seqs of two
/// epochs are not comparable. The published payload is `<epoch>:<seq> <body>`. The list keeps
/// the last `depth` payloads exactly as published, in seq order (the same atomic step numbers
/// them).
pub static PUBLISH: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
if ARGV[5] == '1' then
  local n = redis.call('PUBSUB', 'NUMSUB', ARGV[1])
  if tonumber(n[2]) == 0 then return 0 end
end
local max = 9007199254740991
local cur = tonumber(redis.call('GET', KEYS[1]) or '')
local epoch = redis.call('GET', KEYS[3])
if cur == nil or cur < 0 or cur > max or cur ~= math.floor(cur) or not epoch then
  epoch = ARGV[7]
  cur = 0
  redis.call('DEL', KEYS[2])
end
local seq = math.max(cur, tonumber(ARGV[2])) + 1
if seq > max then return redis.error_reply('ERR roomcast: the room has run out of seqs') end
redis.call('SET', KEYS[1], string.format('%d', seq), 'PX', ARGV[4])
redis.call('SET', KEYS[3], epoch, 'PX', ARGV[4])
local payload = epoch .. ':' .. string.format('%d', seq) .. ' ' .. ARGV[3]
redis.call('PUBLISH', ARGV[1], payload)
local depth = tonumber(ARGV[6])
if depth > 0 then
  redis.call('RPUSH', KEYS[2], payload)
  redis.call('LTRIM', KEYS[2], -depth, -1)
  redis.call('PEXPIRE', KEYS[2], ARGV[4])
end
return seq
",
    )
});

/// Reads (and raises to a floor) the seqs and epochs of rooms this process just subscribed to,
/// with what their history lists keep.
///
/// KEYS[3i - 2]: room i's seq key; KEYS[3i - 1]: its history list; KEYS[3i]: its epoch key.
/// ARGV[1]: key TTL (ms); ARGV[1 + i]: floor of room i; ARGV[2 + n]: how many kept payloads to
/// read per room (0: none); ARGV[3 + n]: a fresh epoch, for rooms whose numbering was lost (as
/// in PUBLISH). Answers, per room, `[seq, [payload, …], epoch]` (payloads oldest first). Run
/// after the SUBSCRIBE is confirmed: every message with a larger seq is published after it and
/// so reaches this process, and every one up to it that the list keeps is in the answer (one
/// atomic step).
pub static SEED: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local n = #KEYS / 3
local max = 9007199254740991
local depth = tonumber(ARGV[n + 2])
local out = {}
for i = 1, n do
  local key = KEYS[3 * i - 2]
  local cur = tonumber(redis.call('GET', key) or '')
  local epoch = redis.call('GET', KEYS[3 * i])
  if cur == nil or cur < 0 or cur > max or cur ~= math.floor(cur) or not epoch then
    epoch = ARGV[n + 3]
    cur = 0
    redis.call('DEL', KEYS[3 * i - 1])
    redis.call('DEL', key)
  end
  local floor = tonumber(ARGV[i + 1])
  if floor > cur then
    cur = floor
  end
  -- Set even at 0: the first PUBLISH then finds this epoch's numbering and keeps the epoch.
  redis.call('SET', key, string.format('%d', cur), 'PX', ARGV[1])
  redis.call('SET', KEYS[3 * i], epoch, 'PX', ARGV[1])
  local kept = {}
  if depth > 0 then kept = redis.call('LRANGE', KEYS[3 * i - 1], -depth, -1) end
  out[i] = {cur, kept, epoch}
end
return out
",
    )
});

/// The counts of every other live process.
///
/// KEYS[1]: the set of node ids. ARGV[1]: node hash key prefix; ARGV[2]: this node's id;
/// ARGV[3..]: rooms to read (none: the whole hash).
/// Answers, per live node other than this one: id, connection count, and either the counts of
/// the rooms asked for (nil where none) or the node's whole hash as field/value pairs.
/// A node whose hash has expired (it stopped heartbeating) is dropped from the set.
pub static COUNTS: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local out = {}
for _, id in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local key = ARGV[1] .. id
  if redis.call('EXISTS', key) == 0 then
    redis.call('SREM', KEYS[1], id)
  elseif id ~= ARGV[2] then
    local counts
    if #ARGV > 2 then
      counts = redis.call('HMGET', key, unpack(ARGV, 3))
    else
      counts = redis.call('HGETALL', key)
    end
    out[#out + 1] = id
    out[#out + 1] = redis.call('HGET', key, '!conns') or '0'
    out[#out + 1] = counts
  end
end
return out
",
    )
});

/// One page of a room's members on the other live processes, from their rosters.
///
/// KEYS[1]: the set of node ids. ARGV[1]: node hash key prefix; ARGV[2]: roster key prefix;
/// ARGV[3]: this node's id; ARGV[4], ARGV[5]: the room's range of roster entries (ZRANGEBYLEX
/// min and max, `wire::roster_range`); ARGV[6]: the most entries to read per process.
/// Answers, per live node other than this one: id, then its entries in the range, in order. A
/// node whose hash has expired (it stopped heartbeating) is skipped: its roster expires with it.
pub static ROSTER: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local out = {}
for _, id in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  if id ~= ARGV[3] and redis.call('EXISTS', ARGV[1] .. id) == 1 then
    out[#out + 1] = id
    out[#out + 1] = redis.call('ZRANGEBYLEX', ARGV[2] .. id, ARGV[4], ARGV[5], 'LIMIT', 0, ARGV[6])
  end
end
return out
",
    )
});
