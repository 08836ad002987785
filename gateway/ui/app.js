// The JobProxy dashboard: the task list (state filter, paging, live states) and a page per task
// (its resources, times, description, the tail of its output, a cancel button). It only calls the
// gateway's own API, polling it every REFRESH_MS; a token, when the gateway asks for one, is kept
// in this tab's session storage and nowhere else. Text from the API is only ever set as text.
"use strict";

(() => {
  const TOKEN_KEY = "jobproxy-token";
  const REFRESH_MS = 2000;
  const TERMINAL = new Set(["COMPLETE", "EXECUTOR_ERROR", "SYSTEM_ERROR", "CANCELED"]);
  const $ = (id) => document.getElementById(id);

  let generation = 0; // bumped whenever the view changes: older refresh loops stop
  let pageTokens = [""]; // the page_token of each page seen so far
  let pageIndex = 0;
  let nextToken = null;

  class Unauthorized extends Error {}

  async function api(method, path, query) {
    const url = new URL(path, document.baseURI);
    for (const [key, value] of Object.entries(query || {})) url.searchParams.set(key, value);
    const headers = { Accept: "application/json" };
    const token = sessionStorage.getItem(TOKEN_KEY);
    if (token) headers.Authorization = "Bearer " + token;
    const response = await fetch(url, { method, headers });
    if (response.status === 401) throw new Unauthorized("the token is missing or not valid");
    const body = response.status === 204 ? null : await response.json();
    if (!response.ok) throw new Error((body && body.error) || response.statusText);
    return body;
  }

  function element(tag, text, attributes) {
    const node = document.createElement(tag);
    if (text !== undefined && text !== null) node.textContent = String(text);
    for (const [key, value] of Object.entries(attributes || {})) node.setAttribute(key, value);
    return node;
  }

  function badge(code) {
    return element("span", code, { class: "state " + code });
  }

  function when(moment) {
    return moment ? new Date(moment).toLocaleString() : "";
  }

  function show(section) {
    for (const id of ["login", "list", "task"]) $(id).hidden = id !== section;
    $("sign-out").hidden = !sessionStorage.getItem(TOKEN_KEY);
  }

  function failed(error) {
    if (error instanceof Unauthorized) {
      generation += 1;
      $("login-error").textContent = sessionStorage.getItem(TOKEN_KEY) ? error.message : "";
      show("login");
      $("token").focus();
      return;
    }
    $("error").textContent = error.message;
  }

  // Run `refresh` now and every REFRESH_MS until the view changes or it answers false.
  function live(refresh) {
    const mine = ++generation;
    const tick = async () => {
      if (mine !== generation) return;
      let again = true;
      try {
        again = (await refresh()) !== false;
        $("error").textContent = "";
      } catch (error) {
        failed(error);
      }
      if (again && mine === generation) setTimeout(tick, REFRESH_MS);
    };
    tick();
  }

  // ---- the task list ----

  async function refreshList() {
    const query = { page_size: $("page-size").value };
    if ($("state").value) query.state = $("state").value;
    if ($("user").value.trim()) query.user = $("user").value.trim();
    if (pageTokens[pageIndex]) query.page_token = pageTokens[pageIndex];
    const body = await api("GET", "v1/jobproxy/state", query);
    const rows = body.state.map((state) => {
      const row = element("tr", null, { "data-id": state.id });
      const link = element("a", state.id, { href: "#/task/" + encodeURIComponent(state.id) });
      const id = element("td", null, { class: "id" });
      id.append(link);
      const code = element("td", null, { class: "code" });
      code.append(badge(state.code));
      row.append(id, element("td", state.user), code, element("td", state.description, { class: "description" }),
                 element("td", when(state.created), { title: state.created || "" }),
                 element("td", when(state.finished), { title: state.finished || "" }));
      return row;
    });
    $("tasks").replaceChildren(...rows);
    $("empty").hidden = rows.length > 0;
    nextToken = body.next_page_token || null;
    $("next").disabled = !nextToken;
    $("previous").disabled = pageIndex === 0;
    $("page-number").textContent = "page " + (pageIndex + 1);
    $("updated").textContent = "updated " + new Date().toLocaleTimeString();
  }

  function firstPage() {
    pageTokens = [""];
    pageIndex = 0;
    live(refreshList);
  }

  // ---- one task ----

  function field(list, name, value) {
    if (value === undefined || value === null || value === "") return;
    list.append(element("dt", name), element("dd", value));
  }

  function command(task) {
    if (task.cmd === undefined) return task.container ? "(the image's command)" : "";
    return Array.isArray(task.cmd) ? JSON.stringify(task.cmd) : task.cmd;
  }

  function showOutput(name, stream) {
    $(name).textContent = stream.tail;
    let info = stream.path;
    if (stream.size !== null) info += ` (${stream.size} bytes${stream.truncated ? ", last " + stream.tail.length + " shown" : ""})`;
    if (stream.note) info += ": " + stream.note;
    $(name + "-info").textContent = info;
  }

  async function refreshTask(id, task) {
    const path = encodeURIComponent(id);
    const [state, output] = await Promise.all([api("GET", "v1/jobproxy/state/" + path),
                                               api("GET", "v1/jobproxy/output/" + path)]);
    $("task-id").textContent = state.id;
    $("task-state").replaceWith(Object.assign(badge(state.code), { id: "task-state" }));
    $("task-description").textContent = state.description;
    $("cancel").hidden = TERMINAL.has(state.code);
    const fields = element("dl", null, { id: "task-fields" });
    field(fields, "user", state.user);
    field(fields, "name", task.name);
    field(fields, "command", command(task));
    field(fields, "image", task.container && task.container.image);
    field(fields, "cores", task.cores);
    field(fields, "memory", task.memory !== undefined ? task.memory + " MiB" : null);
    field(fields, "CPU time", task.cputime !== undefined ? task.cputime + " s" : null);
    field(fields, "scheduler", state.scheduler);
    field(fields, "exit code", state.exit_code);
    field(fields, "created", when(state.created));
    field(fields, "started", when(state.started));
    field(fields, "finished", when(state.finished));
    $("task-fields").replaceWith(fields);
    showOutput("stdout", output.stdout);
    showOutput("stderr", output.stderr);
    return !TERMINAL.has(state.code); // a finished task no longer changes
  }

  async function openTask(id) {
    show("task");
    $("task-id").textContent = id;
    const mine = ++generation;
    try {
      const task = await api("GET", "v1/jobproxy/task/" + encodeURIComponent(id));
      if (mine === generation) live(() => refreshTask(id, task));
    } catch (error) {
      failed(error);
    }
  }

  async function cancel() {
    const id = $("task-id").textContent;
    $("cancel").disabled = true;
    try {
      await api("POST", "ga4gh/tes/v1/tasks/" + encodeURIComponent(id) + ":cancel");
      await openTask(id);
    } catch (error) {
      failed(error);
    } finally {
      $("cancel").disabled = false;
    }
  }

  // ---- wiring ----

  function route() {
    $("error").textContent = "";
    const match = location.hash.match(/^#\/task\/(.+)$/);
    if (match) {
      openTask(decodeURIComponent(match[1]));
    } else {
      show("list");
      live(refreshList);
    }
  }

  document.addEventListener("DOMContentLoaded", () => {
    $("login-form").addEventListener("submit", (event) => {
      event.preventDefault();
      sessionStorage.setItem(TOKEN_KEY, $("token").value.trim());
      $("token").value = "";
      route();
    });
    $("sign-out").addEventListener("click", () => {
      sessionStorage.removeItem(TOKEN_KEY);
      route();
    });
    for (const id of ["state", "page-size"]) $(id).addEventListener("change", firstPage);
    $("user").addEventListener("change", firstPage);
    $("filters").addEventListener("submit", (event) => { event.preventDefault(); firstPage(); });
    $("next").addEventListener("click", () => {
      if (!nextToken) return;
      pageTokens[pageIndex + 1] = nextToken;
      pageIndex += 1;
      live(refreshList);
    });
    $("previous").addEventListener("click", () => {
      if (pageIndex === 0) return;
      pageIndex -= 1;
      live(refreshList);
    });
    $("cancel").addEventListener("click", cancel);
    window.addEventListener("hashchange", route);
    api("GET", "v1/jobproxy/ping").then((ping) => { $("scheduler").textContent = "scheduler: " + ping.scheduler; },
                                         () => {});
    route();
  });
})();
