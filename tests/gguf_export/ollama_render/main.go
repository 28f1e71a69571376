// Command ollama_render renders Ollama chat templates the way the Ollama server does, so that
// tests can compare them with the Hugging Face (Jinja) rendering without installing Ollama.
//
// It reproduces the contract of ollama's template/template.go (Parse and Execute, "Messages"
// form) and of server/routes.go (how a Modelfile SYSTEM reaches the template):
//
//   - the template is parsed with Option("missingkey=zero") and Ollama's functions (json,
//     currentDate, yesterdayDate, toTypeScriptType);
//   - the Modelfile SYSTEM is inserted as the first message when the conversation does not
//     start with a system message;
//   - consecutive messages of the same role are merged with "\n\n" (collate), and all system
//     messages joined with "\n\n" become .System;
//   - the template sees .Messages (Role, Content, Thinking, Images, ToolCalls, ToolName,
//     ToolCallID), .System, .Tools (nil: no tools), .Response = "" (a generation: the reply is
//     what the model writes next), .Think, .ThinkLevel, .IsThinkSet.
//
// Only templates that use .Messages are emulated (every template we write does); the legacy
// .Prompt/.Response form is refused rather than guessed at.
//
// Standard library only, Go 1.13+ (what distributions' golang-go packages ship). Input on
// stdin: one job {"template", "system", "messages": [{"role", "content"}]}, which prints the
// rendered text, or a JSON list of jobs, which prints a JSON list of {"output", "error"} (one
// process for many renders).
package main

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io/ioutil"
	"os"
	"strings"
	"text/template"
	"text/template/parse"
	"time"
)

type message struct {
	Role    string `json:"role"`
	Content string `json:"content"`
}

type job struct {
	Template string    `json:"template"`
	System   string    `json:"system"`
	Messages []message `json:"messages"`
}

type result struct {
	Output string `json:"output"`
	Error  string `json:"error,omitempty"`
}

// templateMessage has the fields of ollama's templateMessage, so that a template reading any of
// them behaves as in Ollama (zero values here: these conversations are text only).
type templateMessage struct {
	Role       string
	Content    string
	Thinking   string
	Images     []string
	ToolCalls  []interface{}
	ToolName   string
	ToolCallID string
}

// templateTools prints as JSON, as ollama's templateTools does.
type templateTools []interface{}

func (t templateTools) String() string {
	b, _ := json.Marshal([]interface{}(t))
	return string(b)
}

var funcs = template.FuncMap{
	"json": func(v interface{}) string {
		b, _ := json.Marshal(v)
		return string(b)
	},
	"currentDate": func(args ...string) string {
		return time.Now().Format("2006-01-02")
	},
	"yesterdayDate": func(args ...string) string {
		return time.Now().AddDate(0, 0, -1).Format("2006-01-02")
	},
	"toTypeScriptType": func(v interface{}) string { return "any" }, // no tools here
}

func render(j job) (string, error) {
	if len(j.Messages) == 0 {
		return "", errors.New("no messages: Ollama only loads the model for an empty chat")
	}
	msgs := j.Messages
	if j.System != "" && msgs[0].Role != "system" { // server/routes.go ChatHandler
		msgs = append([]message{{Role: "system", Content: j.System}}, msgs...)
	}
	system, collated := collate(msgs)

	tmpl, err := template.New("").Option("missingkey=zero").Funcs(funcs).Parse(j.Template)
	if err != nil {
		return "", err
	}
	if !usesMessages(tmpl) {
		return "", errors.New("the template does not use .Messages; the legacy .Prompt/.Response form is not emulated")
	}

	var b bytes.Buffer
	err = tmpl.Execute(&b, map[string]interface{}{
		"System":     system,
		"Messages":   collated,
		"Tools":      templateTools(nil),
		"Response":   "",
		"Think":      false,
		"ThinkLevel": "",
		"IsThinkSet": false,
	})
	return b.String(), err
}

// collate merges consecutive messages of the same role and gathers the system messages, as
// ollama's template.collate does.
func collate(msgs []message) (string, []*templateMessage) {
	var system []string
	var collated []*templateMessage
	for _, m := range msgs {
		if m.Role == "system" {
			system = append(system, m.Content)
		}
		if n := len(collated); n > 0 && collated[n-1].Role == m.Role && m.Role != "tool" {
			collated[n-1].Content += "\n\n" + m.Content
		} else {
			collated = append(collated, &templateMessage{Role: m.Role, Content: m.Content})
		}
	}
	return strings.Join(system, "\n\n"), collated
}

// usesMessages says whether the template names .Messages anywhere (ollama's Template.Vars).
func usesMessages(t *template.Template) bool {
	for _, tt := range t.Templates() {
		if tt.Tree == nil {
			continue
		}
		for _, n := range tt.Root.Nodes {
			for _, id := range identifiers(n) {
				if strings.ToLower(id) == "messages" {
					return true
				}
			}
		}
	}
	return false
}

func identifiers(n parse.Node) []string {
	switch n := n.(type) {
	case *parse.ListNode:
		var names []string
		for _, c := range n.Nodes {
			names = append(names, identifiers(c)...)
		}
		return names
	case *parse.TemplateNode:
		if n.Pipe == nil {
			return nil
		}
		return identifiers(n.Pipe)
	case *parse.ActionNode:
		return identifiers(n.Pipe)
	case *parse.BranchNode:
		names := identifiers(n.Pipe)
		for _, l := range []*parse.ListNode{n.List, n.ElseList} {
			if l != nil {
				names = append(names, identifiers(l)...)
			}
		}
		return names
	case *parse.IfNode:
		return identifiers(&n.BranchNode)
	case *parse.RangeNode:
		return identifiers(&n.BranchNode)
	case *parse.WithNode:
		return identifiers(&n.BranchNode)
	case *parse.PipeNode:
		if n == nil {
			return nil
		}
		var names []string
		for _, c := range n.Cmds {
			for _, a := range c.Args {
				names = append(names, identifiers(a)...)
			}
		}
		return names
	case *parse.FieldNode:
		return n.Ident
	case *parse.VariableNode:
		return n.Ident
	}
	return nil
}

func main() {
	input, err := ioutil.ReadAll(os.Stdin) // io.ReadAll needs Go 1.16
	if err != nil {
		fail(err)
	}
	if trimmed := bytes.TrimSpace(input); len(trimmed) > 0 && trimmed[0] == '[' {
		var jobs []job
		if err := json.Unmarshal(input, &jobs); err != nil {
			fail(err)
		}
		results := make([]result, len(jobs))
		for i, j := range jobs {
			out, err := render(j)
			results[i] = result{Output: out}
			if err != nil {
				results[i].Error = err.Error()
			}
		}
		if err := json.NewEncoder(os.Stdout).Encode(results); err != nil {
			fail(err)
		}
		return
	}
	var j job
	if err := json.Unmarshal(input, &j); err != nil {
		fail(err)
	}
	out, err := render(j)
	if err != nil {
		fail(err)
	}
	fmt.Print(out)
}

func fail(err error) {
	fmt.Fprintln(os.Stderr, "ollama_render:", err)
	os.Exit(1)
}
