// Status page: polls the overview API and renders per-tenant counts and recent failures.
// Data reaches the DOM only through textContent and attributes, never as markup, so a job's
// error text (which can quote anything an upstream service said) is always shown as text.
"use strict";

(() => {
  // Relative, like the page's own assets, so a path prefix in front of the exporter keeps working.
  const API_PATH = "api/v1/overview";
  const TOKEN_KEY = "embedding-jobs.api-token";
  const DEFAULT_REFRESH_SECONDS = 5;
  const MIN_REFRESH_SECONDS = 1;
  const MAX_REFRESH_SECONDS = 3600;
  // Failure ratios above these get amber and red; a few failed attempts are normal for rate-limited
  // embedding endpoints, a fifth of all jobs is an incident.
  const WARN_RATIO = 0.05;
  const CRITICAL_RATIO = 0.2;
  const STATUSES = ["pending", "processing", "completed", "failed", "dead_lettered"];
  const STATUS_LABELS = {
    pending: "pending",
    processing: "processing",
    completed: "completed",
    failed: "failed",
    dead_lettered: "dead-lettered",
  };

  const byId = (id) => document.getElementById(id);
  const numberFormat = new Intl.NumberFormat("en");

  /** Seconds between refreshes: `?refresh=N` clamped to a sane range, else the default. */
  function refreshSeconds() {
    const raw = new URLSearchParams(window.location.search).get("refresh");
    const value = Number(raw);
    if (raw === null || raw.trim() === "" || !Number.isFinite(value)) {
      return DEFAULT_REFRESH_SECONDS;
    }
    return Math.min(MAX_REFRESH_SECONDS, Math.max(MIN_REFRESH_SECONDS, value));
  }

  // sessionStorage: the token lives as long as the tab and is never written to disk by the page.
  // Access can throw when storage is disabled; the page then simply asks again.
  function readToken() {
    try {
      return window.sessionStorage.getItem(TOKEN_KEY) || "";
    } catch {
      return "";
    }
  }

  function writeToken(token) {
    try {
      if (token) {
        window.sessionStorage.setItem(TOKEN_KEY, token);
      } else {
        window.sessionStorage.removeItem(TOKEN_KEY);
      }
    } catch {
      // Storage unavailable: the token is lost on the next load, which is the safe side.
    }
    byId("forget-token").hidden = !token;
  }

  class AuthRequired extends Error {}

  /** GET the overview; resolves to its JSON, rejects with AuthRequired on 401 or Error otherwise. */
  async function fetchOverview(timeoutMs) {
    const headers = { Accept: "application/json" };
    const token = readToken();
    if (token) {
      headers.Authorization = `Bearer ${token}`;
    }
    const controller = new AbortController();
    const timer = window.setTimeout(() => controller.abort(), timeoutMs);
    let response;
    try {
      response = await fetch(API_PATH, {
        headers,
        cache: "no-store",
        credentials: "omit",
        signal: controller.signal,
      });
    } catch (error) {
      throw new Error(error.name === "AbortError" ? `no answer within ${timeoutMs / 1000} s` : "the server is unreachable");
    } finally {
      window.clearTimeout(timer);
    }
    let body = null;
    try {
      body = await response.json();
    } catch {
      body = null;
    }
    if (response.status === 401) {
      throw new AuthRequired(errorMessage(body) || "a valid API token is required");
    }
    if (!response.ok) {
      throw new Error(`HTTP ${response.status}${errorMessage(body) ? `: ${errorMessage(body)}` : ""}`);
    }
    if (!body || !Array.isArray(body.tenants)) {
      throw new Error("the server answered with something that is not an overview");
    }
    return body;
  }

  function errorMessage(body) {
    return body && body.error && typeof body.error.message === "string" ? body.error.message : "";
  }

  // ---- formatting -----------------------------------------------------------------------------

  function count(value) {
    const n = Number(value);
    return Number.isFinite(n) ? n : 0;
  }

  function formatPercent(ratio) {
    if (ratio <= 0) {
      return "0%";
    }
    if (ratio < 0.001) {
      return "<0.1%";
    }
    return `${(ratio * 100).toFixed(1)}%`;
  }

  function pad(n) {
    return String(n).padStart(2, "0");
  }

  // UTC, like the job records, the logs and the dashboards, so times can be compared directly.
  function formatTime(iso) {
    const date = new Date(iso);
    if (!iso || Number.isNaN(date.getTime())) {
      return "—";
    }
    return (
      `${date.getUTCFullYear()}-${pad(date.getUTCMonth() + 1)}-${pad(date.getUTCDate())} ` +
      `${pad(date.getUTCHours())}:${pad(date.getUTCMinutes())}:${pad(date.getUTCSeconds())} UTC`
    );
  }

  // Same definition as the API's failureRatio: failed and dead-lettered jobs out of finished ones
  // (completed, failed, dead-lettered), so a backlog of pending work does not dilute it.
  function failureRatio(stats) {
    const failed = count(stats.failed) + count(stats.dead_lettered);
    const finished = failed + count(stats.completed);
    return finished > 0 ? failed / finished : 0;
  }

  // ---- rendering ------------------------------------------------------------------------------

  function element(tag, options = {}) {
    const node = document.createElement(tag);
    if (options.className) {
      node.className = options.className;
    }
    if (options.text !== undefined) {
      node.textContent = String(options.text);
    }
    for (const [name, value] of Object.entries(options.attrs || {})) {
      node.setAttribute(name, String(value));
    }
    for (const child of options.children || []) {
      node.append(child);
    }
    return node;
  }

  function numberCell(value, status) {
    const attrs = status ? { "data-status": status } : {};
    const zero = value === 0 ? " zero" : "";
    return element("td", { className: `num${zero}`, text: numberFormat.format(value), attrs });
  }

  function ratioCell(ratio) {
    const level = ratio >= CRITICAL_RATIO ? "critical" : ratio > WARN_RATIO ? "warn" : "ok";
    const fill = element("span", { className: "ratio-fill" });
    // CSSOM writes are not inline style attributes, so the strict style-src still allows them.
    fill.style.width = `${Math.min(100, ratio * 100)}%`;
    const bar = element("span", { className: "ratio-bar", attrs: { "aria-hidden": "true" }, children: [fill] });
    const value = element("span", { className: "ratio-value", text: formatPercent(ratio) });
    const wrap = element("span", { className: "ratio", children: [bar, value] });
    return element("td", {
      className: `ratio-col ratio-${level}`,
      attrs: { "data-ratio": ratio },
      children: [wrap],
    });
  }

  function tenantRow(name, stats, total, ratio, rowTag) {
    const row = element("tr", { attrs: rowTag });
    row.append(element("th", { text: name, attrs: { scope: "row" } }));
    for (const status of STATUSES) {
      row.append(numberCell(count(stats[status]), status));
    }
    row.append(numberCell(total, "total"));
    row.append(ratioCell(ratio));
    return row;
  }

  function emptyRow(columns, text) {
    return element("tr", {
      className: "empty",
      children: [element("td", { text, attrs: { colspan: columns } })],
    });
  }

  function renderTenants(tenants) {
    const rows = [];
    const sums = Object.fromEntries(STATUSES.map((status) => [status, 0]));
    let grandTotal = 0;
    for (const tenant of tenants) {
      const stats = tenant.stats || {};
      const total = count(tenant.total);
      const ratio = Number.isFinite(tenant.failureRatio) ? tenant.failureRatio : failureRatio(stats);
      rows.push(tenantRow(String(tenant.tenantId), stats, total, ratio, { "data-tenant": tenant.tenantId }));
      for (const status of STATUSES) {
        sums[status] += count(stats[status]);
      }
      grandTotal += total;
    }
    byId("tenant-rows").replaceChildren(...(rows.length ? rows : [emptyRow(8, "No jobs recorded yet.")]));
    const totals = rows.length
      ? [tenantRow("All tenants", sums, grandTotal, failureRatio(sums), { "data-totals": "" })]
      : [];
    byId("tenant-totals").replaceChildren(...totals);
  }

  function renderFailures(failures) {
    const rows = failures.map((job) => {
      const status = String(job.status || "");
      const shard = element("td", { className: "id", text: job.shardId ?? "" });
      if (job.shardTypeId) {
        shard.append(element("span", { className: "sub", text: job.shardTypeId }));
      }
      const error = element("td", { className: "error", text: job.error || "(no error recorded)" });
      const updated = element("td", {
        className: "time",
        children: [element("time", { text: formatTime(job.updatedAt), attrs: { datetime: job.updatedAt ?? "" } })],
      });
      return element("tr", {
        attrs: { "data-job": job.id ?? "" },
        children: [
          element("td", { text: job.tenantId ?? "" }),
          element("td", { className: "id mono", text: job.id ?? "" }),
          shard,
          element("td", {
            children: [element("span", { className: `badge badge-${status}`, text: STATUS_LABELS[status] || status })],
          }),
          numberCell(count(job.retryCount)),
          error,
          updated,
        ],
      });
    });
    byId("failure-rows").replaceChildren(...(rows.length ? rows : [emptyRow(7, "No failed or dead-lettered jobs.")]));
  }

  function render(overview) {
    renderTenants(overview.tenants);
    renderFailures(Array.isArray(overview.recentFailures) ? overview.recentFailures : []);
    byId("failures-truncated").hidden = !overview.truncated;
    const updated = byId("last-updated");
    updated.replaceChildren(
      "Last updated ",
      element("time", { text: formatTime(overview.generatedAt), attrs: { datetime: overview.generatedAt ?? "" } }),
    );
    updated.classList.remove("stale");
  }

  // kind "error" for failures, "info" for a prompt that is not one (signing in for the first time).
  function showBanner(text, kind = "error") {
    const banner = byId("banner");
    banner.textContent = text;
    banner.className = `banner banner-${kind}`;
    banner.hidden = false;
  }

  function hideBanner() {
    const banner = byId("banner");
    banner.hidden = true;
    banner.textContent = "";
  }

  function showTokenForm(message) {
    byId("token-help").textContent = message;
    byId("token-form").hidden = false;
    byId("token").focus();
  }

  // ---- refresh loop ---------------------------------------------------------------------------

  const refreshMs = refreshSeconds() * 1000;
  let timer = null;
  let running = false;
  let haveData = false;

  async function refresh() {
    try {
      const overview = await fetchOverview(Math.max(refreshMs, 10000));
      render(overview);
      haveData = true;
      hideBanner();
      byId("token-form").hidden = true;
      return true;
    } catch (error) {
      if (error instanceof AuthRequired) {
        const rejected = Boolean(readToken());
        writeToken("");
        showBanner(
          rejected ? "The API token was not accepted." : "Sign in with an API token to see the job overview.",
          rejected ? "error" : "info",
        );
        showTokenForm(
          rejected
            ? "That token was not accepted; enter another one. It is kept in this browser tab only."
            : "This status page needs an API token. It is kept in this browser tab only.",
        );
        // No point polling without credentials; submitting the form starts again.
        return false;
      }
      const kept = haveData ? " Showing the last data received." : "";
      const reason = error.message.replace(/[.\s]+$/, "");
      showBanner(`Could not load the job overview: ${reason}.${kept}`);
      byId("last-updated").classList.toggle("stale", haveData);
      return true;
    }
  }

  // Each refresh is scheduled after the previous one finishes, so a slow server never gets
  // overlapping requests from one tab.
  async function tick() {
    window.clearTimeout(timer);
    if (running) {
      return;
    }
    running = true;
    let again = true;
    try {
      if (!document.hidden) {
        again = await refresh();
      }
    } finally {
      running = false;
      if (again) {
        timer = window.setTimeout(tick, refreshMs);
      }
    }
  }

  function start() {
    const seconds = refreshMs / 1000;
    byId("refresh-note").textContent = `Refreshes every ${seconds} s`;
    byId("forget-token").hidden = !readToken();
    byId("token-form").addEventListener("submit", (event) => {
      // Handled here so the token never ends up in a URL (the CSP forbids form submissions anyway).
      event.preventDefault();
      const input = byId("token");
      const token = input.value.trim();
      if (!token) {
        return;
      }
      writeToken(token);
      input.value = "";
      byId("token-form").hidden = true;
      hideBanner();
      tick();
    });
    byId("forget-token").addEventListener("click", () => {
      writeToken("");
      tick();
    });
    document.addEventListener("visibilitychange", () => {
      if (!document.hidden) {
        tick();
      }
    });
    tick();
  }

  start();
})();
