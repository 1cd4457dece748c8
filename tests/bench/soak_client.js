// The JS leg of tests/bench/soak.py: the legacy JS SDK novita-sdk@1.0.31, as its users call it,
// through the soak's load balancer. A new task about every INTERVAL seconds (jittered), whatever
// the earlier ones are doing, each a user of its own (its own NovitaSDK): it submits and waits with
// the SDK's own wait helper, upscaleSync (a poll every second by setInterval, then the images
// fetched as base64). When standard input closes, no new tasks; SIGTERM aborts those in flight
// (reported as ended). One JSON line per task outcome.
//
//   SOAK_API_KEY=... node soak_client.js SDK_DIR BASE_URL BODIES_JSON INTERVAL_S TASK_TIMEOUT_S
// BODIES_JSON: {"image": "<base64 PNG>", "bodies": [["name", {V2 fields}], ...]}
'use strict';
const fs = require('fs');
const path = require('path');

const [sdkDir, baseUrl, bodiesFile, intervalS, timeoutS] = process.argv.slice(2);
const { NovitaSDK } = require(path.join(path.resolve(sdkDir), 'node_modules', 'novita-sdk'));
const { image, bodies } = JSON.parse(fs.readFileSync(bodiesFile, 'utf8'));
const PNG_DATA_URL = 'data:image/png;base64,iVBORw0KGgo'; // the PNG signature, base64

let stopping = false; // no new tasks: standard input closed
let ending = false; // SIGTERM: abort what is in flight
const inFlight = new Set(); // AbortControllers of the tasks in flight
const emit = (record) => process.stdout.write(JSON.stringify({ t: Date.now() / 1000, client: 'js', ...record }) + '\n');

// A user's SDK instance. The two instance wrappers only note what the SDK's own calls returned
// (the task id; the last status polled), so that an error can be told apart: submission, poll, or
// image download. The SDK's behaviour is left as it is.
function makeClient() {
  const sdk = new NovitaSDK(process.env.SOAK_API_KEY);
  sdk.setBaseUrl(baseUrl);
  const state = { taskId: null, status: null };
  const upscale = sdk.upscale.bind(sdk);
  sdk.upscale = (params, opts) => upscale(params, opts).then((data) => {
    state.taskId = data && data.task_id;
    return data;
  });
  const progress = sdk.progress.bind(sdk);
  sdk.progress = (params, opts) => progress(params, opts).then((data) => {
    state.status = data && data.status;
    return data;
  });
  return { sdk, state };
}

async function runTask([name, fields]) {
  const { sdk, state } = makeClient();
  const abort = new AbortController();
  inFlight.add(abort);
  let timedOut = false;
  const timer = setTimeout(() => { timedOut = true; abort.abort(); }, Number(timeoutS) * 1000);
  const base = { body: name, started: Date.now() / 1000 };
  try {
    const imgs = await sdk.upscaleSync({ image, ...fields }, { img_type: 'base64' }, { signal: abort.signal });
    const ok = Array.isArray(imgs) && imgs.length > 0 && imgs.every((s) => String(s).startsWith(PNG_DATA_URL));
    emit({ ...base, task_id: state.taskId, outcome: ok ? 'succeeded' : 'bad image', phase: 'download',
           detail: ok ? '' : `images: ${JSON.stringify((imgs || []).map((s) => String(s).slice(0, 40)))}` });
  } catch (e) {
    const phase = !state.taskId ? 'submit' : state.status === 2 ? 'download' : 'poll';
    emit({ ...base, task_id: state.taskId, outcome: 'error', phase, timed_out: timedOut, ended: ending && !timedOut,
           code: e && e.code, msg: e && (e.msg !== undefined ? e.msg : e.message), reason: e && e.reason,
           task_status: e && e.metadata ? e.metadata.task_status : undefined,
           error: e && e.constructor ? e.constructor.name : typeof e });
  } finally {
    clearTimeout(timer);
    inFlight.delete(abort);
    if (stopping && inFlight.size === 0) process.exit(0);
  }
}

let next = 0;
function arrive() {
  if (stopping) return;
  runTask(bodies[next++ % bodies.length]);
  setTimeout(arrive, Number(intervalS) * 1000 * (0.5 + Math.random())); // users are not in step
}

process.stdin.on('data', () => {});
process.stdin.on('end', () => {
  stopping = true;
  if (inFlight.size === 0) process.exit(0);
});
process.on('SIGTERM', () => {
  stopping = ending = true;
  for (const c of inFlight) c.abort();
  setTimeout(() => process.exit(0), 3000).unref();
});
arrive();
