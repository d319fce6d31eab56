from django.contrib import admin, messages
from django.core.exceptions import PermissionDenied
from django.db.models import Count
from django.http import HttpResponse, HttpResponseRedirect
from django.template.response import TemplateResponse
from django.urls import path, reverse
from django.utils.html import format_html
from django.utils.translation import gettext_lazy as _
from django.utils.translation import ngettext

from knowledge import formats, services
from knowledge.forms import ImportForm, MoveToCategoryForm, QAPairForm
from knowledge.models import Category, QAPair


@admin.register(Category)
class CategoryAdmin(admin.ModelAdmin):
    list_display = ("name", "pair_count", "description")
    search_fields = ("name", "description")

    def get_queryset(self, request):
        return super().get_queryset(request).annotate(_pair_count=Count("pairs"))

    @admin.display(description=_("Q&A pairs"), ordering="_pair_count")
    def pair_count(self, obj):
        return obj._pair_count


@admin.register(QAPair)
class QAPairAdmin(admin.ModelAdmin):
    form = QAPairForm
    list_display = ("id", "question", "alternate_count", "category", "status", "split", "source", "updated_at")
    list_display_links = ("id", "question")
    list_filter = ("status", "category", "split", "source", "created_at")
    list_select_related = ("category",)
    search_fields = ("instruction", "output", "alternates")
    date_hierarchy = "created_at"
    list_per_page = 50
    readonly_fields = (
        "training_preview", "question_hash", "source", "created_by", "created_at", "updated_by", "updated_at",
    )
    fieldsets = (
        (None, {"fields": ("instruction", "alternates", "input", "output")}),
        (_("Curation"), {"fields": ("category", "status", "split")}),
        (
            _("Training text preview"),
            {
                "fields": ("training_preview",),
                "description": _(
                    "Exactly what the model is trained on: the question in a user turn, the answer in a model "
                    "turn ending with the end-of-turn marker so that the model learns to stop. Saved changes "
                    "show here after saving."
                ),
            },
        ),
        (_("Record"), {"classes": ("collapse",), "fields": ("question_hash", "source", "created_by", "created_at", "updated_by", "updated_at")}),
    )
    # Where a pair went and came from is known to the apps above the knowledge base (training: the
    # versions trained on it; chat: the answer it was drafted from). Each adds its display function
    # with add_lineage(), so this admin shows them without importing either.
    lineage = ()
    actions = ("approve", "archive", "move_to_category", "export_json", "export_jsonl", "export_csv", "train_adapter")

    @admin.display(description=_("question"), ordering="instruction")
    def question(self, obj):
        return str(obj)

    @admin.display(description=_("alternates"))
    def alternate_count(self, obj):
        return len(obj.alternates)

    @admin.display(description=_("rendered training text"))
    def training_preview(self, obj):
        if obj.pk is None:
            return _("Save the pair to see its training text.")
        return format_html('<pre style="white-space: pre-wrap; margin: 0">{}</pre>', obj.training_text())

    @classmethod
    def add_lineage(cls, display):
        """Show `display(pair)` (an @admin.display function) in the change form's Lineage section."""
        cls.lineage = (*cls.lineage, display)

    def get_readonly_fields(self, request, obj=None):
        return (*super().get_readonly_fields(request, obj), *self.lineage)

    def get_fieldsets(self, request, obj=None):
        fieldsets = super().get_fieldsets(request, obj)
        if not self.lineage:
            return fieldsets
        return (*fieldsets[:-1], (_("Lineage"), {"fields": self.lineage}), fieldsets[-1])

    def save_model(self, request, obj, form, change):
        if not change:
            obj.created_by = request.user
        obj.updated_by = request.user
        super().save_model(request, obj, form, change)

    # --- bulk actions: a few lines each, the work is in services ---

    @admin.action(description=_("Approve selected pairs (they join the next training snapshot)"), permissions=["change"])
    def approve(self, request, queryset):
        changed = services.qa_set_status(pairs=queryset, status=QAPair.Status.APPROVED, user=request.user)
        self.message_user(request, ngettext("%d pair approved.", "%d pairs approved.", changed) % changed, messages.SUCCESS)

    @admin.action(description=_("Archive selected pairs (kept, never trained on)"), permissions=["change"])
    def archive(self, request, queryset):
        changed = services.qa_set_status(pairs=queryset, status=QAPair.Status.ARCHIVED, user=request.user)
        self.message_user(request, ngettext("%d pair archived.", "%d pairs archived.", changed) % changed, messages.SUCCESS)

    @admin.action(description=_("Move selected pairs to a category…"), permissions=["change"])
    def move_to_category(self, request, queryset):
        selected = request.POST.getlist(admin.helpers.ACTION_CHECKBOX_NAME)
        select_across = request.POST.get("select_across", "0")
        if "apply" in request.POST:
            form = MoveToCategoryForm(request.POST, selected=selected, select_across=select_across)
            if form.is_valid():
                category = form.cleaned_data["category"]
                changed = services.qa_move_to_category(pairs=queryset, category=category, user=request.user)
                self.message_user(
                    request,
                    ngettext("%(n)d pair moved to %(c)s.", "%(n)d pairs moved to %(c)s.", changed)
                    % {"n": changed, "c": category.name},
                    messages.SUCCESS,
                )
                return None
        else:
            form = MoveToCategoryForm(selected=selected, select_across=select_across)
        context = {
            **self.admin_site.each_context(request),
            "opts": self.model._meta,
            "title": _("Move Q&A pairs to a category"),
            "form": form,
            "pairs": queryset[:20],
            "count": queryset.count(),
        }
        return TemplateResponse(request, "admin/knowledge/qapair/move_to_category.html", context)

    def _export(self, queryset, file_format):
        response = HttpResponse(services.qa_export(pairs=queryset, file_format=file_format), content_type=formats.CONTENT_TYPES[file_format])
        response["Content-Disposition"] = f'attachment; filename="qa-pairs.{file_format}"'
        return response

    @admin.action(description=_("Export selected pairs as alpaca JSON"), permissions=["view"])
    def export_json(self, request, queryset):
        return self._export(queryset, "json")

    @admin.action(description=_("Export selected pairs as JSONL"), permissions=["view"])
    def export_jsonl(self, request, queryset):
        return self._export(queryset, "jsonl")

    @admin.action(description=_("Export selected pairs as CSV"), permissions=["view"])
    def export_csv(self, request, queryset):
        return self._export(queryset, "csv")

    @admin.action(description=_("Train a new adapter on the approved pairs…"), permissions=["view"])
    def train_adapter(self, request, queryset):
        # Training always uses every approved pair (a frozen snapshot), whatever is selected.
        return HttpResponseRedirect(reverse("admin:training_trainingrun_start"))

    # --- import page and filtered export ---

    def get_urls(self):
        info = self.opts.app_label, self.opts.model_name
        return [
            path("import/", self.admin_site.admin_view(self.import_view), name="%s_%s_import" % info),
            path("export/", self.admin_site.admin_view(self.export_view), name="%s_%s_export" % info),
        ] + super().get_urls()

    def import_view(self, request):
        if not (self.has_add_permission(request) and self.has_change_permission(request)):
            raise PermissionDenied
        report = None
        if request.method == "POST":
            form = ImportForm(request.POST, request.FILES)
            if form.is_valid():
                data = form.cleaned_data
                upload = data["file"]
                report = services.qa_import(
                    content=upload.read(),
                    filename=upload.name,
                    file_format=data["file_format"] or None,
                    status=data["status"] or None,
                    split=data["split"] or None,
                    user=request.user,
                    dry_run=data["dry_run"],
                )
                self._report_message(request, report)
        else:
            form = ImportForm()
        context = {
            **self.admin_site.each_context(request),
            "opts": self.opts,
            "title": _("Import Q&A pairs"),
            "form": form,
            "report": report,
            "changelist_url": reverse("admin:knowledge_qapair_changelist"),
        }
        return TemplateResponse(request, "admin/knowledge/qapair/import.html", context)

    def _report_message(self, request, report):
        counts = report.counts
        if report.file_error:
            self.message_user(request, _("Nothing was imported: %(error)s") % {"error": report.file_error}, messages.ERROR)
        elif not report.ok:
            self.message_user(
                request,
                _("Nothing was imported: %(n)d row(s) rejected. Fix them and upload the file again.") % {"n": counts["rejected"]},
                messages.ERROR,
            )
        elif report.dry_run:
            self.message_user(request, _("Dry run: the file is fine; nothing was saved."), messages.INFO)
        else:
            self.message_user(
                request,
                _("Imported: %(created)d created, %(updated)d updated, %(skipped)d skipped as duplicates.") % counts,
                messages.SUCCESS,
            )

    def export_view(self, request):
        if not self.has_view_permission(request):
            raise PermissionDenied
        # The changelist's own filters and search select the pairs; file_format is ours.
        request.GET = request.GET.copy()
        file_format = request.GET.pop("file_format", ["json"])[0]
        if file_format not in formats.FORMATS:
            self.message_user(request, _("Unknown export format."), messages.ERROR)
            return HttpResponseRedirect(reverse("admin:knowledge_qapair_changelist"))
        changelist = self.get_changelist_instance(request)
        return self._export(changelist.get_queryset(request), file_format)

