// What every browser test shares: one line per check, the first failed check stopping the
// ones after it (later checks build on earlier ones), an error outside any check counted once,
// and an exit status that is 0 only if every check passed.

let passed = 0;
let failed = 0;
const failureHooks = [];

/** Runs `hook(checkName)` when a check fails, after its FAIL line: screenshots and page state,
 * so that a failure seen once can be read afterwards. A hook that throws is reported and
 * skipped. */
export function onFailure(hook) {
  failureHooks.push(hook);
}

const firstLine = (err) => String(err?.message || err).split('\n')[0];

export async function check(name, fn) {
  try {
    await fn();
    passed += 1;
    console.log(`ok   ${name}`);
  } catch (err) {
    failed += 1;
    console.log(`FAIL ${name}: ${firstLine(err)}`);
    for (const hook of failureHooks) {
      try {
        await hook(name);
      } catch (e) {
        console.log(`     (a failure hook failed: ${firstLine(e)})`);
      }
    }
    if (err && typeof err === 'object') err.reported = true;
    throw err;
  }
}

export function assert(cond, msg) {
  if (!cond) throw new Error(msg);
}

/** An error that no check reported (chromium failed to start, a setup step threw). */
export function setupFailed(err) {
  if (!err?.reported) {
    failed += 1;
    console.log(`FAIL setup: ${firstLine(err)}`);
  }
}

/** Prints the count and exits: 0 only if every check passed. */
export function finish() {
  console.log(`${passed} passed, ${failed} failed`);
  process.exit(failed === 0 ? 0 : 1);
}
