// The results page, live (commit_ci/web.py serves it with the page, from the same origin).
//
// About once a second it asks the dispatcher's /api which jobs run (api/queue), shows
// each running job's live log as it grows (api/tail/<commit>?offset=N), and when a job
// stops running, its verdict (api/lookup/<commit>); then it fetches the page again and
// puts its new results in place of the old, without a reload. Everything it shows that
// comes from a commit is set as text (textContent, text nodes), never as markup; the
// fetched page is markup the server escaped, parsed inert by DOMParser.
"use strict";

(function () {
  const POLL_MS = 1000;
  //: Finished jobs kept in the running section, newest first, with their verdicts.
  const DONE_SHOWN = 5;
  //: Requests for more of one log per turn (each at most 64 KiB).
  const READS_PER_TURN = 8;
  const FINAL = new Set(["passed", "failed", "flaky", "error", "cancelled", "skipped"]);

  const container = document.getElementById("running-jobs");
  const nothing = document.getElementById("running-none");
  if (!container) {
    return;
  }
  const jobs = new Map(); // commit -> {box, log, badge, offset, done}
  const wanted = new Set(); // commits judged, not on the page shown yet
  let newest = null; // the newest result the dispatcher had at the last turn

  async function getJSON(url) {
    const response = await fetch(url, { cache: "no-store" });
    if (!response.ok) {
      throw new Error(url + ": HTTP " + response.status);
    }
    return response.json();
  }

  function addBox(job) {
    const box = document.createElement("div");
    box.className = "job";
    box.dataset.commit = job.commit;
    const head = document.createElement("div");
    const badge = document.createElement("span");
    badge.className = "badge live-verdict";
    badge.textContent = "running";
    const sha = document.createElement("code");
    sha.className = "sha";
    sha.textContent = job.commit.slice(0, 10);
    const where = document.createElement("span");
    where.className = "author";
    where.textContent = job.shards && job.shards.length
      ? " in " + job.shards[0].shards + " shards" // each on a runner of its own
      : " on " + job.runner + ", attempt " + job.attempt;
    head.append(badge, " ", sha, where);
    const log = document.createElement("pre");
    log.className = "live-log";
    box.append(head, log);
    container.prepend(box);
    return { box: box, log: log, badge: badge, offset: 0, done: false };
  }

  async function readLog(commit, job) {
    for (let i = 0; i < READS_PER_TURN; i++) {
      const part = await getJSON("api/tail/" + commit + "?offset=" + job.offset);
      if (part.source !== "live") {
        return; // none yet, or the verdict's final log: the results link to it
      }
      if (part.offset < job.offset) {
        job.log.textContent = ""; // a new attempt started the live log afresh
        job.offset = 0;
        continue;
      }
      if (part.text) {
        const follow = job.log.scrollTop + job.log.clientHeight >= job.log.scrollHeight - 4;
        job.log.append(document.createTextNode(part.text));
        if (follow) {
          job.log.scrollTop = job.log.scrollHeight;
        }
      }
      job.offset = part.offset;
      if (part.offset >= part.size) {
        return;
      }
    }
  }

  function settle(commit, job, state) {
    job.done = true;
    job.badge.textContent = state;
    if (/^[a-z]+$/.test(state)) {
      job.box.classList.add("verdict-" + state);
    }
    job.box.dataset.verdict = state;
    wanted.add(commit);
    const done = Array.from(jobs.entries()).filter(([, other]) => other.done);
    for (const [old, other] of done.slice(0, Math.max(0, done.length - DONE_SHOWN))) {
      other.box.remove();
      jobs.delete(old);
    }
  }

  async function refreshResults() {
    const response = await fetch("./", { cache: "no-store" });
    if (!response.ok) {
      return;
    }
    const fresh = new DOMParser().parseFromString(await response.text(), "text/html");
    const results = fresh.getElementById("results");
    const current = document.getElementById("results");
    if (results && current) {
      current.replaceWith(document.adoptNode(results));
    }
    const meta = fresh.querySelector("header .meta");
    const currentMeta = document.querySelector("header .meta");
    if (meta && currentMeta) {
      currentMeta.replaceWith(document.adoptNode(meta));
    }
    document.title = fresh.title;
    for (const commit of Array.from(wanted)) {
      if (document.getElementById("c-" + commit)) {
        wanted.delete(commit);
      }
    }
  }

  async function turn() {
    const queue = await getJSON("api/queue?limit=1");
    const running = new Set();
    for (const item of queue.running) {
      running.add(item.commit);
      let job = jobs.get(item.commit);
      if (!job || job.done) {
        if (job) {
          job.box.remove();
        }
        job = addBox(item);
        jobs.set(item.commit, job);
      }
      await readLog(item.commit, job);
    }
    for (const [commit, job] of jobs) {
      if (job.done || running.has(commit)) {
        continue;
      }
      const found = await getJSON("api/lookup/" + commit);
      if (FINAL.has(found.state)) {
        settle(commit, job, found.state);
      } else {
        job.badge.textContent = found.state; // queued again: its runner was lost
      }
    }
    nothing.hidden = jobs.size > 0;
    const recent = await getJSON("api/recent?limit=1");
    const latest = recent.results.length ? recent.results[0].commit + " " + recent.results[0].finished_at : "";
    if (newest !== null && latest !== newest && recent.results.length) {
      wanted.add(recent.results[0].commit);
    }
    newest = latest;
    if (wanted.size) {
      await refreshResults();
    }
  }

  async function loop() {
    try {
      await turn();
      document.body.dataset.live = "ok";
    } catch (error) {
      document.body.dataset.live = "unreachable"; // the dispatcher restarting: the next turn tries again
    }
    setTimeout(loop, POLL_MS);
  }

  loop();
})();
