// Reads what the emulator needs from herd's PTX: every .entry with its .param list, its
// .maxntid (__launch_bounds__) and its static shared memory (.shared declarations in its body,
// module-scope .shared variables it names, and those of the .func it calls).
#include <cctype>
#include <cstring>
#include <functional>
#include <map>
#include <set>
#include <sstream>

#include "emu.h"

namespace emu {

namespace {

struct Func {
    std::string name;
    bool entry = false;
    std::string params;  // the text between ( and )
    std::string header;  // between ) and {
    std::string body;
};

bool ident_char(char c) { return isalnum((unsigned char)c) || c == '_' || c == '$' || c == '.'; }

// "name[123]" -> 123 (1 when there is no [])
size_t array_count(const std::string& tok) {
    size_t lb = tok.find('[');
    if (lb == std::string::npos) return 1;
    return strtoull(tok.c_str() + lb + 1, nullptr, 10);
}

// Bytes of a .shared declaration "... .b8 name[128];" / ".f32 name[4];" / ".u32 name;"
bool shared_decl(const std::string& line, std::string* name, size_t* bytes) {
    std::istringstream ss(line);
    std::string tok, last;
    size_t elem = 0;
    bool shared = false;
    while (ss >> tok) {
        if (tok == ".shared") shared = true;
        else if (tok[0] == '.' && tok != ".align" && tok != ".extern" && tok != ".visible") {
            const char* t = tok.c_str() + 2;  // .b8 .u32 .f64 ...
            if (strchr("busf", tok[1]) && isdigit((unsigned char)*t)) elem = strtoul(t, nullptr, 10) / 8;
        }
        last = tok;
    }
    if (!shared || elem == 0 || last.empty()) return false;
    if (last.back() == ';') last.pop_back();
    size_t lb = last.find('[');
    *name = lb == std::string::npos ? last : last.substr(0, lb);
    *bytes = elem * array_count(last);
    return true;
}

}  // namespace

bool ptx_parse(const char* text, std::vector<PtxEntry>* out, std::string* why) {
    std::string s(text);
    if (s.find(".version") == std::string::npos || s.find(".target") == std::string::npos) {
        *why = "the image is not PTX text (no .version/.target); the emulator runs PTX only";
        return false;
    }
    std::vector<Func> funcs;
    std::map<std::string, size_t> module_shared;  // module-scope .shared variables
    size_t i = 0, n = s.size();
    int depth = 0;
    while (i < n) {
        // One statement/line at a time at module scope.
        size_t eol = s.find('\n', i);
        if (eol == std::string::npos) eol = n;
        std::string line = s.substr(i, eol - i);
        size_t c = line.find("//");
        if (c != std::string::npos) line = line.substr(0, c);
        bool is_entry = line.find(".entry") != std::string::npos;
        bool is_func = !is_entry && line.find(".func") != std::string::npos;
        if (depth == 0 && (is_entry || is_func)) {
            // Header: up to '(' (or the body '{' for a .func without parameters).
            Func f;
            f.entry = is_entry;
            size_t kw = s.find(is_entry ? ".entry" : ".func", i);
            size_t p = kw + (is_entry ? 6 : 5);
            // A .func may declare a return value first: .func (.param .b32 r) name(...)
            while (p < n && isspace((unsigned char)s[p])) p++;
            if (!is_entry && s[p] == '(') {
                size_t close = s.find(')', p);
                p = close + 1;
                while (p < n && isspace((unsigned char)s[p])) p++;
            }
            size_t q = p;
            while (q < n && ident_char(s[q])) q++;
            f.name = s.substr(p, q - p);
            size_t brace = s.find('{', q);
            size_t semi = s.find(';', q);
            if (semi != std::string::npos && (brace == std::string::npos || semi < brace)) {
                // A declaration (prototype) only.
                i = semi + 1;
                continue;
            }
            if (brace == std::string::npos) {
                *why = "PTX function " + f.name + " has no body";
                return false;
            }
            size_t open = s.find('(', q);
            if (open != std::string::npos && open < brace) {
                size_t close = s.find(')', open);
                f.params = s.substr(open + 1, close - open - 1);
                f.header = s.substr(close + 1, brace - close - 1);
            } else {
                f.header = s.substr(q, brace - q);
            }
            // The body: to the matching '}'.
            int d = 0;
            size_t b = brace;
            for (; b < n; b++) {
                if (s[b] == '{') d++;
                else if (s[b] == '}' && --d == 0) break;
            }
            f.body = s.substr(brace + 1, b - brace - 1);
            funcs.push_back(f);
            i = b + 1;
            continue;
        }
        if (depth == 0 && line.find(".shared") != std::string::npos) {
            std::string name;
            size_t bytes;
            if (shared_decl(line, &name, &bytes)) module_shared[name] = bytes;
        }
        for (char ch : line) {
            if (ch == '{') depth++;
            else if (ch == '}') depth--;
        }
        i = eol + 1;
    }

    std::map<std::string, const Func*> by_name;
    for (auto& f : funcs) by_name[f.name] = &f;

    // Static shared bytes reachable from a function body (its own .shared, module .shared it
    // names, the same for every .func it calls).
    std::function<void(const Func*, std::set<std::string>*, std::set<std::string>*)> walk =
        [&](const Func* f, std::set<std::string>* vars, std::set<std::string>* seen) {
            if (!seen->insert(f->name).second) return;
            std::istringstream body(f->body);
            std::string line;
            while (std::getline(body, line)) {
                std::string name;
                size_t bytes;
                size_t c = line.find("//");
                if (c != std::string::npos) line = line.substr(0, c);
                if (line.find(".shared") != std::string::npos && line.find("ld.") == std::string::npos &&
                    line.find("st.") == std::string::npos && line.find("cvta") == std::string::npos &&
                    line.find("mov") == std::string::npos && shared_decl(line, &name, &bytes)) {
                    vars->insert(f->name + "::" + name);
                    module_shared[f->name + "::" + name] = bytes;
                    continue;
                }
                for (auto& kv : module_shared)
                    if (kv.first.find("::") == std::string::npos && line.find(kv.first) != std::string::npos)
                        vars->insert(kv.first);
                size_t call = line.find("call");
                if (call != std::string::npos) {
                    for (auto& kv : by_name)
                        if (!kv.second->entry && line.find(kv.first) != std::string::npos)
                            walk(kv.second, vars, seen);
                }
            }
        };

    for (auto& f : funcs) {
        if (!f.entry) continue;
        PtxEntry e;
        e.name = f.name;
        // Parameters: ".param .u64 name", ".param .u64 .ptr .global .align 8 name",
        // ".param .align 8 .b8 name[32]".
        std::istringstream ps(f.params);
        std::string decl;
        while (std::getline(ps, decl, ',')) {
            std::istringstream ts(decl);
            std::string tok;
            ParamInfo pi{ParamKind::Integer, 0};
            std::string type, last;
            while (ts >> tok) {
                if (tok == ".param" || tok == ".ptr" || tok == ".global" || tok == ".const" || tok == ".local" ||
                    tok == ".shared")
                    continue;
                if (tok == ".align") {
                    ts >> tok;
                    continue;
                }
                if (tok[0] == '.') type = tok;
                else last = tok;
            }
            if (type.empty()) continue;
            size_t bits = strtoul(type.c_str() + 2, nullptr, 10);
            pi.kind = type[1] == 'f' ? ParamKind::Float : ParamKind::Integer;
            pi.size = bits / 8;
            if (last.find('[') != std::string::npos) {
                pi.kind = ParamKind::Aggregate;
                pi.size *= array_count(last);
            }
            e.params.push_back(pi);
            e.param_text.push_back(type + (pi.kind == ParamKind::Aggregate ? "[" + std::to_string(pi.size) + "]" : ""));
        }
        size_t mx = f.header.find(".maxntid");
        if (mx != std::string::npos) {
            unsigned v[3] = {1, 1, 1};
            const char* p = f.header.c_str() + mx + 8;
            for (int d = 0; d < 3; d++) {
                while (*p && !isdigit((unsigned char)*p) && *p != '\n' && *p != '.') p++;
                if (!isdigit((unsigned char)*p)) break;
                v[d] = strtoul(p, (char**)&p, 10);
                while (*p == ' ' || *p == '\t') p++;
                if (*p != ',') break;
                p++;
            }
            for (int d = 0; d < 3; d++) e.maxntid[d] = v[d];
        }
        std::set<std::string> vars, seen;
        walk(&f, &vars, &seen);
        for (auto& v : vars) e.static_smem += module_shared[v];
        out->push_back(e);
    }
    if (out->empty()) {
        *why = "the PTX has no .entry";
        return false;
    }
    return true;
}

}  // namespace emu
